"""Model cards for unlearned models: our own template, with Hub metadata built by `huggingface_hub.ModelCardData`.

A card is rendered from a `RunSummary`, a plain record of what was unlearned and how (set sizes, loss terms and
weights, gradual negatives, training length, PEFT). The summary is also stored in the card's metadata under `gnm`,
so a card can be rebuilt from a saved folder later (for example to add evaluation results before a push).
Nothing here reads or writes a Hub token; command lines are stored with any token flag removed.
"""

import dataclasses
import enum
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .data.loading import looks_like_hub_id

CARD_FILE = "README.md"
METADATA_KEY = "gnm"
BASE_TAGS = ("unlearning", "gnm", "gradual-negative-matching")
PAPER_URL = "https://doi.org/10.1007/978-3-031-88714-7_16"
CITATION = """@inproceedings{kulkarni2025gnm,
  title     = {Gradual Negative Matching for {LLM} Unlearning},
  author    = {Kulkarni, Hrishikesh and Goharian, Nazli and Frieder, Ophir},
  booktitle = {Advances in Information Retrieval: 47th European Conference on Information Retrieval (ECIR 2025)},
  series    = {Lecture Notes in Computer Science},
  pages     = {183--191},
  year      = {2025},
  publisher = {Springer},
  doi       = {10.1007/978-3-031-88714-7_16}
}"""

TERM_MEANINGS = {
    "ga": "gradient ascent on the forget set (minus the NLL of its true completions)",
    "gd": "gradient descent on the retain set (NLL of its completions)",
    "klr": "KL(p_ref ‖ p_θ) on retain completions: stay close to the original model",
    "klf": "capped KL ascent on forget completions: move away from the original model",
    "rm": "random matching: forget prompts trained towards random retain completions",
    "gnm": "gradual negative matching: forget prompts trained towards gradually wrong completions",
    "npo": "negative preference optimisation on the forget set",
    "simnpo": "SimNPO: NPO on the forget completions' mean NLL, without a reference model",
    "klb": "KL(p_base ‖ p_θ) on the forget set: back to the base model, the model before it read the forget set",
}
SCHEDULE_MEANINGS = {
    "gradual": "level 1 (slightly wrong) in the first 1/K of training, up to level K (fully wrong) in the last 1/K",
    "random": "a random level for each example at each step",
    "all": "every level at each step, averaged",
}
# GNMConfig / TrainingArguments fields that describe the recipe (weights are added for the enabled terms only).
RECIPE_FIELDS = (
    "negative_schedule",
    "reference_model",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "max_prompt_length",
    "text_template",
    "seed",
)
PEFT_FIELDS = (
    "peft_type", "r", "init_r", "target_r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform",
    "use_rslora", "use_dora",
)
PEFT_NAMES = {"LORA": "LoRA", "ADALORA": "AdaLoRA"}
# Command-line flags whose value must never reach a card.
SECRET_FLAGS = ("--hub_token", "--token")


@dataclasses.dataclass
class RunSummary:
    """What a card says about one unlearning run; every field may be unknown (None)."""

    model_name: str | None = None
    base_model: str | None = None
    adapter: bool = False
    peft: dict[str, Any] | None = None
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)
    forget_size: int | None = None
    retain_size: int | None = None
    negative_levels: int | None = None
    trained_steps: int | None = None
    trained_epochs: float | None = None
    world_size: int | None = None
    datasets: list[str] = dataclasses.field(default_factory=list)
    license: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    command: str | None = None
    uses_trl: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunSummary":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @property
    def loss_weights(self) -> dict[str, float]:
        return {term: self.recipe.get(f"{term}_weight") for term in self.recipe.get("loss_terms", [])}

    @property
    def effective_batch_size(self) -> int | None:
        per_device = self.recipe.get("per_device_train_batch_size")
        if per_device is None:
            return None
        return per_device * self.recipe.get("gradient_accumulation_steps", 1) * (self.world_size or 1)


# ---------------------------------------------------------------------------------------------------------------
# Summaries from a configuration, a PEFT config, a command line
# ---------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A YAML/JSON-friendly version of a config value (enums by value, sets as sorted lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def recipe_from_config(args) -> dict[str, Any]:
    """The recipe of a `GNMConfig`: loss terms, the weight of each enabled term, schedule and training settings."""
    terms = list(args.loss_terms)
    recipe: dict[str, Any] = {"loss_terms": terms}
    recipe.update({f"{term}_weight": getattr(args, f"{term}_weight") for term in terms})
    if "npo" in terms:
        recipe["npo_beta"] = args.npo_beta
    if "simnpo" in terms:
        recipe["simnpo_beta"], recipe["simnpo_delta"] = args.simnpo_beta, args.simnpo_delta
    if "klf" in terms:
        recipe["klf_cap"] = args.klf_cap
    if "klb" in terms:
        recipe["base_model"] = args.base_model
    if getattr(args, "forget_chunks", 1) > 1:
        recipe["forget_chunks"], recipe["epochs_per_chunk"] = args.forget_chunks, args.epochs_per_chunk
    recipe.update({name: _plain(getattr(args, name)) for name in RECIPE_FIELDS if hasattr(args, name)})
    return recipe


def peft_summary(peft_config) -> dict[str, Any]:
    """The settings of a PEFT config that a reader needs (type, ranks, alpha, dropout, target modules).

    Target modules that PEFT resolved to full paths (`model.layers.0.mlp.up_proj`, ...) are listed by their last
    name (`up_proj`), which selects the same modules when the recipe is run again.
    """
    values = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(peft_config)
    summary = {name: _plain(values[name]) for name in PEFT_FIELDS if values.get(name) not in (None, "")}
    summary = {name: value for name, value in summary.items() if value is not False}  # switches that are off
    if isinstance(summary.get("target_modules"), list):
        summary["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in summary["target_modules"]})
    return summary


def command_from_argv(argv: Sequence[str]) -> str | None:
    """The `gnm unlearn ...` line that ran, from `sys.argv`, without any token flag; None outside `gnm unlearn`."""
    argv = list(argv)
    if "unlearn" not in argv[1:]:
        return None
    arguments = argv[argv.index("unlearn", 1) + 1 :]
    kept, skip_next = [], False
    for argument in arguments:
        if skip_next:
            skip_next = False
            continue
        flag = argument.split("=", 1)[0]
        if flag in SECRET_FLAGS:
            skip_next = "=" not in argument
            continue
        kept.append(argument)
    return shlex.join(["gnm", "unlearn", *kept])


def _flag_value(command: str | None, flag: str) -> str | None:
    if not command:
        return None
    parts = shlex.split(command)
    for index, part in enumerate(parts):
        if part == flag and index + 1 < len(parts):
            return parts[index + 1]
        if part.startswith(flag + "="):
            return part.split("=", 1)[1]
    return None


def summary_from_trainer(
    trainer,
    merged: bool = False,
    model_name: str | None = None,
    datasets: Sequence[str] | str | None = None,
    license: str | None = None,
    tags: Sequence[str] | str | None = None,
    argv: Sequence[str] | None = None,
) -> RunSummary:
    """Everything a `GNMTrainer` knows about its run. `datasets` defaults to `--dataset_name` of the command line."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    peft_config, base_model = None, getattr(model.config, "_name_or_path", None)
    if hasattr(model, "peft_config") and hasattr(model, "active_adapter"):
        peft_config = model.peft_config[model.active_adapter]
        base_model = peft_config.base_model_name_or_path or base_model
    command = command_from_argv(sys.argv if argv is None else argv)
    if datasets is None:
        datasets = _flag_value(command, "--dataset_name")
    negatives = getattr(trainer.data_collator, "negative_completions", None)
    return RunSummary(
        model_name=model_name,
        base_model=base_model or None,
        adapter=peft_config is not None and not merged,
        peft=peft_summary(peft_config) if peft_config is not None else None,
        recipe=recipe_from_config(trainer.args),
        forget_size=len(trainer.forget_rows) if getattr(trainer, "forget_rows", None) is not None else None,
        retain_size=len(trainer.retain_rows) if getattr(trainer, "retain_rows", None) is not None else None,
        negative_levels=len(next(iter(negatives.values()))) if negatives else None,
        trained_steps=trainer.state.global_step,
        trained_epochs=round(trainer.state.epoch, 4) if trainer.state.epoch is not None else None,
        world_size=trainer.args.world_size,
        datasets=[datasets] if isinstance(datasets, str) else list(datasets or []),
        license=license,
        tags=[tags] if isinstance(tags, str) else list(tags or []),
        command=command,
        uses_trl=command is not None,  # `gnm unlearn` is parsed by TRL's TrlParser over TRL's ModelConfig
    )


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def summary_from_directory(model_dir: str, merged: bool = False) -> RunSummary:
    """A summary of a saved model folder: the `gnm` metadata of its card when there is one, else what its
    `adapter_config.json` and `trainer_state.json` tell."""
    card_path = os.path.join(model_dir, CARD_FILE)
    if os.path.isfile(card_path):
        stored = ModelCard.load(card_path).data.to_dict().get(METADATA_KEY)
        if isinstance(stored, Mapping):
            summary = RunSummary.from_dict(stored)
            summary.adapter = summary.adapter and not merged
            return summary
    summary = RunSummary()
    adapter_config = _read_json(os.path.join(model_dir, "adapter_config.json"))
    if adapter_config is not None:
        summary.adapter = not merged
        summary.peft = peft_summary(adapter_config)
        summary.base_model = adapter_config.get("base_model_name_or_path") or None
    state = _read_json(os.path.join(model_dir, "trainer_state.json"))
    if state is not None:
        summary.trained_steps = state.get("global_step")
        summary.trained_epochs = state.get("epoch")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _split_evaluation(evaluation_results: Mapping[str, Any] | None) -> tuple[Mapping | None, Mapping | None]:
    """`{"before": r0, "after": r1}` gives both columns; a single results dict is shown alone."""
    if not evaluation_results:
        return None, None
    if "after" in evaluation_results and set(evaluation_results) <= {"before", "after"}:
        before = evaluation_results.get("before")
        return (before, evaluation_results["after"]) if before else (evaluation_results["after"], None)
    return evaluation_results, None


def _number(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def peft_name(peft: Mapping[str, Any] | None) -> str:
    peft_type = str((peft or {}).get("peft_type", "PEFT"))
    return PEFT_NAMES.get(peft_type, peft_type)


def _objective_section(summary: RunSummary) -> list[str]:
    weights = summary.loss_weights
    if not weights:
        return ["## Unlearning objective", "", "The loss terms of this run are not recorded.", ""]
    lines = [
        "## Unlearning objective",
        "",
        "Total loss = Σ weight × term, every term computed on completion tokens only (never on prompt or padding).",
        "",
        "| term | meaning | weight |",
        "|---|---|---:|",
    ]
    lines += [f"| `{term}` | {TERM_MEANINGS.get(term, term)} | {_number(weight)} |" for term, weight in weights.items()]
    lines.append("")
    if "gnm" in weights:
        schedule = summary.recipe.get("negative_schedule", "gradual")
        levels = summary.negative_levels
        lines += [
            f"Gradual negatives: K = {_number(levels)} levels per forget example; schedule `{schedule}`: "
            f"{SCHEDULE_MEANINGS.get(schedule, schedule)}.",
            "",
        ]
    return lines


def _training_section(summary: RunSummary) -> list[str]:
    recipe = summary.recipe
    planned = recipe.get("max_steps")
    steps = _number(summary.trained_steps)
    if planned and planned > 0:
        steps += f" (of {planned} planned)"
    batch = _number(summary.effective_batch_size)
    if summary.effective_batch_size is not None:
        batch += (
            f" ({recipe.get('per_device_train_batch_size')} per device × {summary.world_size or 1} process(es) × "
            f"{recipe.get('gradient_accumulation_steps', 1)} accumulation step(s))"
        )
    rows = [
        ("optimizer steps", steps),
        ("epochs", _number(summary.trained_epochs)),
        ("effective batch size", batch),
        ("learning rate", f"{_number(recipe.get('learning_rate'))}, `{recipe.get('lr_scheduler_type', 'unknown')}` "
                          f"schedule, {_number(recipe.get('warmup_steps', 0))} warm-up steps"),
        ("reference model", f"`{recipe.get('reference_model', 'unknown')}`"),
        ("max length (tokens)", _number(recipe.get("max_length"))),
        ("text template", f"`{recipe['text_template']}`" if "text_template" in recipe else "unknown"),
        ("seed", _number(recipe.get("seed"))),
    ]
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines.append("")
    if summary.peft:
        settings = ", ".join(f"{name} = {value}" for name, value in summary.peft.items() if name != "peft_type")
        kind = peft_name(summary.peft)
        where = "shipped as an adapter" if summary.adapter else "merged into the weights of this repository"
        lines += ["## PEFT", "", f"{kind} ({settings}), {where}.", ""]
    return lines


def _usage_section(summary: RunSummary) -> list[str]:
    repo = summary.model_name or "<this repository>"
    if summary.adapter:
        base = summary.base_model or "<base model>"
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
    return ["## How to use", "", "```python", *code, "```", ""]


def recipe_yaml(summary: RunSummary) -> str:
    """A `gnm unlearn --config` recipe that reproduces the run's settings (data paths are given on the command line)."""
    recipe: dict[str, Any] = {}
    if summary.base_model:
        recipe["model_name_or_path"] = summary.base_model
    recipe.update(summary.recipe)
    if summary.peft:
        recipe["use_peft"] = True
        if summary.peft.get("peft_type") == "ADALORA":
            recipe["peft_method"] = "adalora"
            recipe["lora_r"] = summary.peft.get("init_r")
            recipe["adalora_target_r"] = summary.peft.get("target_r")
        else:
            recipe["lora_r"] = summary.peft.get("r")
        for name in ("lora_alpha", "lora_dropout"):
            if name in summary.peft:
                recipe[name] = summary.peft[name]
        if "target_modules" in summary.peft:
            recipe["lora_target_modules"] = summary.peft["target_modules"]
        if not summary.adapter:
            recipe["merge_adapters"] = True
    return yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}, sort_keys=False, allow_unicode=True)


def _reproduction_section(summary: RunSummary) -> list[str]:
    lines = ["## Reproduce", ""]
    if summary.command:
        lines += ["The command that produced this model:", "", "```bash", summary.command, "```", ""]
    data = "--dataset_name " + summary.datasets[0] if summary.datasets else "--data_dir <forget/retain folder>"
    negatives = " --negatives_path <negatives file>" if "gnm" in summary.recipe.get("loss_terms", []) else ""
    lines += [
        "The same settings as a recipe (`recipe.yaml`):",
        "",
        "```yaml",
        recipe_yaml(summary).rstrip("\n"),
        "```",
        "",
        "```bash",
        f"gnm unlearn --config recipe.yaml {data}{negatives} --output_dir <output folder>",
        "```",
        "",
    ]
    return lines


def _evaluation_section(evaluation_results: Mapping[str, Any] | None) -> list[str]:
    from .evaluation.report import markdown_report

    before, after = _split_evaluation(evaluation_results)
    if before is None:
        return []
    report = markdown_report(before, after, title="Evaluation")
    # The report's own title becomes a section of the card.
    return ["#" + report.rstrip("\n"), ""]


def library_version() -> str:
    from . import __version__

    return __version__


def card_metadata(summary: RunSummary) -> ModelCardData:
    """The card's YAML header: library, base model, tags, datasets, license, and the summary under `gnm`."""
    tags = [*BASE_TAGS, *(["trl"] if summary.uses_trl else [])]
    if summary.peft:
        tags += ["peft", str(summary.peft.get("peft_type", "")).lower()]
    tags = list(dict.fromkeys(tag for tag in [*tags, *summary.tags] if tag))
    base_model = summary.base_model if summary.base_model and looks_like_hub_id(summary.base_model) else None
    return ModelCardData(
        library_name="peft" if summary.adapter else "transformers",
        base_model=base_model,
        tags=tags,
        datasets=summary.datasets or None,
        license=summary.license,
        model_name=summary.model_name,
        pipeline_tag="text-generation",
        **{METADATA_KEY: summary.to_dict()},
    )


def build_model_card(summary: RunSummary, evaluation_results: Mapping[str, Any] | None = None) -> ModelCard:
    """The model card of an unlearned model.

    Args:
        summary: what was unlearned and how (`summary_from_trainer`, `summary_from_directory`).
        evaluation_results: SemEval results (`evaluate_model`): one results dict, or `{"before": ..., "after": ...}`
            for the table before and after unlearning.
    """
    metadata = card_metadata(summary)
    title = summary.model_name or "Unlearned model"
    base = f"`{summary.base_model}`" if summary.base_model else "A causal language model"
    content = f"a {peft_name(summary.peft)} adapter for the base model" if summary.adapter else "the full weights"
    sizes = (
        f"{_number(summary.forget_size)} forget examples and {_number(summary.retain_size)} retain examples"
        + (f" from {', '.join(f'`{name}`' for name in summary.datasets)}" if summary.datasets else "")
    )
    body = [
        f"# {title}",
        "",
        f"{base} after unlearning with Gradual Negative Matching (GNM, [Kulkarni et al., ECIR 2025]({PAPER_URL})), "
        f"trained with the `gnm_trainer` library (version {library_version()}). This repository holds {content}.",
        "",
        "## What was unlearned",
        "",
        f"The model was trained on {sizes} to stop reproducing the forget set's completions (documents, answers, "
        "personal data) while keeping its behaviour on the retain set.",
        "",
        *_objective_section(summary),
        *_training_section(summary),
        *_evaluation_section(evaluation_results),
        *_usage_section(summary),
        *_reproduction_section(summary),
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(body))
