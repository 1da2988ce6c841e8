"""Merging saved LoRA adapters into one (`gnm merge`), as ZJUKLAB did at SemEval-2025 Task 4.

ZJUKLAB (2nd place; Xu et al., arXiv 2503.21088) trained two NPO+GD+KL LoRA adapters on the same target, one that
forgets too much and one that forgets too little, and merged them with TIES (trim each update to its largest
entries, elect a sign per entry, average the entries that agree with it). The merge is PEFT's own
`PeftModel.add_weighted_adapter`; this module checks that the adapters can be merged, names the folder and field
when they cannot, and writes the merged adapter atomically with its tokenizer, `merge_info.json` and a model card.
"""

import os
from typing import Any

from .errors import GNMInputError
from .io_utils import atomic_directory, atomic_write_json, atomic_write_text, check_output_folder, read_json_file

# ZJUKLAB's setting (their released code, zjunlp/unlearn semeval25): both adapters at weight 1.0, TIES keeping 80%
# of the entries of each update.
DEFAULT_DENSITY = 0.8
DEFAULT_WEIGHT = 1.0
MERGE_INFO_FILE = "merge_info.json"
# Merges that keep the rank of the sources (so every source needs the same `r`) and the ones that take `density`.
SAME_RANK_COMBINATIONS = ("ties", "linear")
COMBINATION_TYPES = (*SAME_RANK_COMBINATIONS, "ties_svd")
DENSITY_COMBINATIONS = ("ties", "ties_svd")
MAJORITY_SIGN_METHODS = ("total", "frequency")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json fields that must agree between the sources for PEFT to merge them into one adapter.
MATCHING_FIELDS = ("target_modules", "layers_to_transform", "layers_pattern")
# Switches whose merged adapter PEFT would get wrong (checked with PEFT 0.21): refused rather than merged silently.
UNSUPPORTED_SWITCHES = {
    "use_rslora": "PEFT's merged adapter keeps rsLoRA's scaling on top of the sources' folded one (sqrt(r) too large)",
    "use_dora": "PEFT merges the LoRA factors but not DoRA's magnitude vectors",
}
MERGED_ADAPTER = "default"  # PEFT saves the adapter named "default" at the top of the folder


def merge_adapters(
    adapter_dirs: list[str],
    output_dir: str,
    weights: list[float] | None = None,
    combination_type: str = "ties",
    density: float = DEFAULT_DENSITY,
    base_model: str | None = None,
    majority_sign_method: str = "total",
    overwrite_output_dir: bool = False,
) -> str:
    """Merge saved LoRA adapters into one adapter in `output_dir` and return its path.

    Args:
        adapter_dirs: two or more LoRA adapter folders (as `gnm unlearn` saves them) over the same base model.
        output_dir: where the merged adapter, its tokenizer, `merge_info.json` and `README.md` are written; the
            folder appears whole or not at all. An existing non-empty folder is refused unless
            `overwrite_output_dir`.
        weights: one weight per adapter (default 1.0 each, as ZJUKLAB merged; their defaults are read from the
            team's released code). PEFT folds each adapter's LoRA scaling into its weight, so the merged adapter
            has `lora_alpha == r`.
        combination_type: `ties` (default, ZJUKLAB's), `linear` or `ties_svd` (PEFT's names). PEFT's `ties` and
            `linear` merge the LoRA A and B factors separately and need the same rank `r`; `ties_svd` merges the
            full weight updates and factorises the result back to the largest rank.
        density: the share (0, 1] of each update's entries that TIES keeps (default 0.8, ZJUKLAB's).
        base_model: the base model to load (default: the adapters' `base_model_name_or_path`), for adapters whose
            base has moved; the merged adapter records it.
        majority_sign_method: how TIES elects each entry's sign: `total` (default, the sign of the sum) or
            `frequency` (the more frequent sign).
        overwrite_output_dir: replace an existing non-empty `output_dir`.
    """
    configs = check_merge(adapter_dirs, output_dir, weights, combination_type, density, majority_sign_method,
                          overwrite_output_dir)
    weights = [DEFAULT_WEIGHT] * len(adapter_dirs) if weights is None else [float(weight) for weight in weights]
    base = base_model or base_model_of(adapter_dirs[0])
    model = load_sources(base, adapter_dirs)
    model.add_weighted_adapter(
        [source_name(index) for index in range(len(adapter_dirs))], weights, MERGED_ADAPTER,
        combination_type=combination_type, density=density if combination_type in DENSITY_COMBINATIONS else None,
        majority_sign_method=majority_sign_method,
    )
    model.set_adapter(MERGED_ADAPTER)
    for index in range(len(adapter_dirs)):
        model.delete_adapter(source_name(index))
    model.peft_config[MERGED_ADAPTER].base_model_name_or_path = model.base_model.model.name_or_path
    info = {
        "combination_type": combination_type,
        "density": density if combination_type in DENSITY_COMBINATIONS else None,
        "majority_sign_method": majority_sign_method,
        "weights": weights,
        "base_model": model.peft_config[MERGED_ADAPTER].base_model_name_or_path,
        "sources": [
            {"path": os.path.abspath(path), "r": config.get("r")} for path, config in zip(adapter_dirs, configs)
        ],
    }
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        load_tokenizer(adapter_dirs[0], base).save_pretrained(staging)
        atomic_write_json(os.path.join(staging, MERGE_INFO_FILE), info)
        atomic_write_text(os.path.join(staging, "README.md"), merged_card(info, staging))
    return output_dir


def source_name(index: int) -> str:
    return f"source_{index}"


# ---------------------------------------------------------------------------------------------------------------
# Checks (every one before the base model is loaded)
# ---------------------------------------------------------------------------------------------------------------


def check_merge(adapter_dirs, output_dir, weights, combination_type, density, majority_sign_method,
                overwrite_output_dir) -> list[dict[str, Any]]:
    """Every check that needs no model; returns the adapters' configs. A problem is one GNMInputError."""
    if len(adapter_dirs) < 2:
        raise GNMInputError(f"adapters: {len(adapter_dirs)} given; merging needs at least 2 adapter folders")
    if weights is not None and len(weights) != len(adapter_dirs):
        raise GNMInputError(
            f"weights: {len(weights)} given for {len(adapter_dirs)} adapters; give one weight per adapter"
        )
    if combination_type not in COMBINATION_TYPES:
        raise GNMInputError(f"combination_type: {combination_type!r} is not one of {', '.join(COMBINATION_TYPES)}")
    if not 0 < density <= 1:
        raise GNMInputError(f"density: {density} is outside (0, 1]; it is the share of each update's entries kept")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise GNMInputError(
            f"majority_sign_method: {majority_sign_method!r} is not one of {', '.join(MAJORITY_SIGN_METHODS)}"
        )
    configs = [read_lora_config(path) for path in adapter_dirs]
    check_compatible(adapter_dirs, configs, combination_type)
    check_output(output_dir, adapter_dirs, overwrite_output_dir)
    return configs


def read_lora_config(adapter_dir: str) -> dict[str, Any]:
    """The adapter_config.json of a LoRA adapter folder that holds its weights; anything else is a GNMInputError."""
    if not os.path.isdir(adapter_dir):
        raise GNMInputError(f"{adapter_dir}: no such adapter folder")
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise GNMInputError(
            f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json); give folders saved by "
            "`gnm unlearn --use_peft` (a merged full model cannot be merged again)"
        )
    config = read_json_file(config_path, "adapter config")
    if not isinstance(config, dict):
        raise GNMInputError(f"{config_path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise GNMInputError(
            f"{config_path}: field 'peft_type' is {peft_type!r}; only LoRA adapters can be merged (PEFT's "
            "add_weighted_adapter); train with --peft_method lora"
        )
    for switch, reason in UNSUPPORTED_SWITCHES.items():
        if config.get(switch):
            raise GNMInputError(
                f"{config_path}: field '{switch}' is true; only plain LoRA adapters can be merged ({reason})"
            )
    if not any(os.path.isfile(os.path.join(adapter_dir, name)) for name in WEIGHT_FILES):
        raise GNMInputError(f"{adapter_dir}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
    return config


def comparable(field: str, value: Any) -> Any:
    """A config value in a form that compares equal when PEFT would treat it the same (module lists unordered)."""
    if field == "target_modules" and isinstance(value, list):
        return sorted(value)
    if field == "base_model_name_or_path" and isinstance(value, str) and os.path.isdir(value):
        return os.path.realpath(value)
    return value


def check_compatible(adapter_dirs: list[str], configs: list[dict[str, Any]], combination_type: str) -> None:
    """The sources share a base model, the adapted modules and layers (and the rank, for same-rank merges)."""
    fields = ["base_model_name_or_path", *MATCHING_FIELDS]
    if combination_type in SAME_RANK_COMBINATIONS:
        fields.append("r")
    first_dir, first = adapter_dirs[0], configs[0]
    for path, config in zip(adapter_dirs[1:], configs[1:]):
        for field in fields:
            if comparable(field, config.get(field)) != comparable(field, first.get(field)):
                raise GNMInputError(
                    f"{os.path.join(path, 'adapter_config.json')}: field '{field}' is {config.get(field)!r}, but "
                    f"{first_dir} has {first.get(field)!r}; {combination_type} merges adapters with the same {field}"
                )


def check_output(output_dir: str, adapter_dirs: list[str], overwrite_output_dir: bool) -> None:
    """`output_dir` can be written, is not a source, and is empty unless it may be replaced."""
    check_output_folder(output_dir, "output_dir")
    target = os.path.realpath(output_dir)
    if any(os.path.realpath(path) == target for path in adapter_dirs):
        raise GNMInputError(f"output_dir: {output_dir} is one of the adapters being merged; choose another folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite_output_dir:
        raise GNMInputError(
            f"output_dir: {output_dir} is not empty; choose another folder or pass --overwrite_output_dir to replace it"
        )


# ---------------------------------------------------------------------------------------------------------------
# Loading and writing
# ---------------------------------------------------------------------------------------------------------------


def base_model_of(adapter_dir: str) -> str:
    """The base model an adapter names (checked to exist when it is a local path)."""
    from .model_loading import adapter_base

    base = adapter_base(adapter_dir)
    if not base:
        raise GNMInputError(
            f"{os.path.join(adapter_dir, 'adapter_config.json')}: field 'base_model_name_or_path' is empty; "
            "give the base model with --base_model"
        )
    return base


class _AdapterLoader:
    """`from_pretrained(adapter_dir, adapter_name=...)` that loads one more adapter into a PEFT model (the first
    wraps the base model), so that `model_loading.from_pretrained` reports its faults in one line."""

    def __init__(self, base_model):
        self.model = base_model

    def from_pretrained(self, adapter_dir: str, adapter_name: str):
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(adapter_dir, adapter_name=adapter_name)
        else:
            self.model = PeftModel.from_pretrained(self.model, adapter_dir, adapter_name=adapter_name)
        return self.model


def load_sources(base: str, adapter_dirs: list[str]):
    """The base model (in its checkpoint's dtype: a 7B bf16 base stays bf16; PEFT keeps LoRA weights in float32)
    with every adapter loaded under `source_<i>`."""
    from transformers import AutoModelForCausalLM

    from .model_loading import from_pretrained

    loader = _AdapterLoader(from_pretrained(AutoModelForCausalLM, base, "base model", dtype="auto"))
    for index, path in enumerate(adapter_dirs):
        from_pretrained(loader, path, "adapter", adapter_name=source_name(index))
    return loader.model


def load_tokenizer(adapter_dir: str, base: str):
    """The first adapter's tokenizer when it saved one, else the base model's."""
    from transformers import AutoTokenizer

    from .model_loading import TOKENIZER_FILES, from_pretrained

    saved = any(os.path.isfile(os.path.join(adapter_dir, name)) for name in TOKENIZER_FILES)
    return from_pretrained(AutoTokenizer, adapter_dir if saved else base, "tokenizer")


def merged_card(info: dict[str, Any], adapter_dir: str) -> str:
    """A short model card: the card metadata of `model_card` (base model, PEFT settings) and what was merged."""
    from .model_card import RunSummary, card_metadata, library_version, peft_summary

    adapter_config = read_json_file(os.path.join(adapter_dir, "adapter_config.json"), "adapter config")
    summary = RunSummary(base_model=info["base_model"], adapter=True, peft=peft_summary(adapter_config),
                         tags=["merge", info["combination_type"]])
    density = "" if info["density"] is None else f", density {info['density']}"
    rows = [f"| `{source['path']}` | {weight} |" for source, weight in zip(info["sources"], info["weights"])]
    body = [
        "# Merged unlearning adapter",
        "",
        f"A LoRA adapter for `{info['base_model']}`: {len(rows)} adapters merged with `{info['combination_type']}` "
        f"(PEFT `add_weighted_adapter`{density}, majority sign `{info['majority_sign_method']}`) by `gnm merge` "
        f"(gnm_trainer {library_version()}), as ZJUKLAB merged an over- and an under-forgetting adapter at "
        "SemEval-2025 Task 4 ([arXiv 2503.21088](https://arxiv.org/abs/2503.21088)).",
        "",
        "| source adapter | weight |",
        "|---|---:|",
        *rows,
        "",
        f"`{MERGE_INFO_FILE}` records the same settings.",
        "",
    ]
    return f"---\n{card_metadata(summary).to_yaml()}\n---\n\n" + "\n".join(body)
