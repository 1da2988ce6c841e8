"""Questions about a model that several modules ask (is it a PEFT model, is it AdaLoRA), the merged save, and the
trainable weights of a Trainer checkpoint (saved and loaded the same way by resume and by the collapse guard).

They live here, below the trainer, so that the guard, the Hub upload and the manifest can use them without
importing `gnm_trainer.gnm_trainer` (which imports them in turn).

AdaLoRA checkpoints. PEFT saves an AdaLoRA adapter trimmed to its rank pattern, and the weights it trims still
matter while training goes on: a pruned triplet's singular value grows back between two allocations, its A and B
rows are kept orthogonal by the regulariser, and the next allocation may keep it again. A Trainer checkpoint of an
AdaLoRA model therefore holds the untrimmed adapter (`adapter_config.json` without `rank_pattern`, so that
`PeftModel.from_pretrained` loads it into the same shapes) and, in `adalora_state.pt`, the rank pattern and the
`RankAllocator`'s importance scores, so that a resumed run continues exactly like an uninterrupted one. The final
`save_model` keeps PEFT's trimmed format. Trimmed folders (PEFT's format, checkpoints written before this) still
load: the kept triplets go back to their places and the pruned ones are zero.
"""

import contextlib
import glob
import os

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

ADALORA_STATE_NAME = "adalora_state.pt"
# The RankAllocator's importance scores: the last sensitivity, its moving average and its uncertainty, per matrix.
_IMPORTANCE_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def is_peft_model(model) -> bool:
    """Whether `model` is a `peft.PeftModel` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the package importable without it
        return False
    return isinstance(model, PeftModel)


def is_adalora(model) -> bool:
    """Whether `model` is a PEFT model whose active adapter is AdaLoRA."""
    if not is_peft_model(model):
        return False
    from peft import AdaLoraConfig

    return isinstance(model.peft_config.get(model.active_adapter), AdaLoraConfig)


def save_merged(peft_model, tokenizer, output_dir: str) -> None:
    """Write the adapter merged into full weights (from a copy: the trained PEFT model stays usable) and the tokenizer."""
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


def train_adapter(peft_model):
    """Make the active adapter of a `PeftModel` handed in trainable: one loaded by `PeftModel.from_pretrained` without
    `is_trainable=True` is frozen, and training it would fail (no parameter needs a gradient)."""
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    if config.inference_mode:
        logger.warning("The adapter %r was loaded for inference (frozen); it is made trainable to be unlearned.", adapter)
        config.inference_mode = False
    peft_model.set_requires_grad(adapter, requires_grad=True)
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: save (AdaLoRA untrimmed) and load (resume and rollback)
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def adalora_checkpoint(model, checkpoint_dir: str, is_main_process: bool = True, with_importance: bool = True):
    """Around a Trainer checkpoint save: an AdaLoRA adapter is saved untrimmed, then its rank pattern (and, with
    `with_importance`, the RankAllocator's importance scores) go to `adalora_state.pt`. Nothing changes for others."""
    if not is_adalora(model):
        yield
        return
    config = model.peft_config[model.active_adapter]
    if is_main_process:
        allocator = model.base_model.rankallocator
        importance = {name: getattr(allocator, name) for name in _IMPORTANCE_SCORES} if with_importance else None
        os.makedirs(checkpoint_dir, exist_ok=True)
        state = {"rank_pattern": config.rank_pattern, "importance": importance}
        torch.save(state, os.path.join(checkpoint_dir, ADALORA_STATE_NAME))
    rank_pattern, config.rank_pattern = config.rank_pattern, None  # PEFT trims by the rank pattern when it has one
    try:
        yield
    finally:
        config.rank_pattern = rank_pattern


def load_checkpoint_weights(model, checkpoint_dir: str) -> None:
    """Load the trainable weights saved in a Trainer checkpoint into `model`: the trained adapter of a PEFT model
    (AdaLoRA with its rank pattern and importance scores), or the full weights (one `model.safetensors` or shards)."""
    if is_peft_model(model):
        _load_adapter(model, checkpoint_dir)
    else:
        _load_full_weights(model, checkpoint_dir)


def _load_adapter(model, checkpoint_dir: str) -> None:
    from peft import PeftConfig, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    adapter = model.active_adapter
    device = next(p.device for name, p in model.named_parameters() if f".{adapter}" in name)
    weights = load_peft_weights(checkpoint_dir, device=str(device))
    if not is_adalora(model):
        set_peft_model_state_dict(model, weights, adapter_name=adapter)
        return
    config = model.peft_config[adapter]
    state_path = os.path.join(checkpoint_dir, ADALORA_STATE_NAME)
    if os.path.isfile(state_path):
        state = torch.load(state_path, map_location=device, weights_only=True)
    else:  # a trimmed folder: PEFT's own format, or a checkpoint written before the untrimmed ones
        state = {"rank_pattern": PeftConfig.from_pretrained(checkpoint_dir).rank_pattern, "importance": None}
        if state["rank_pattern"]:
            weights = _untrimmed(model, weights, state["rank_pattern"])
    config.rank_pattern = None  # load into the untrimmed modules as they are: PEFT would resize them otherwise
    set_peft_model_state_dict(model, weights, adapter_name=adapter)
    config.rank_pattern = state["rank_pattern"]
    if state["importance"] is not None:
        allocator = model.base_model.rankallocator
        for name, scores in state["importance"].items():
            setattr(allocator, name, scores)


def _untrimmed(model, weights: dict, rank_pattern: dict) -> dict:
    """A trimmed AdaLoRA state dict (no adapter name in its keys) back in the model's untrimmed shapes: each kept
    triplet at its rank index, the pruned ones zero."""
    adapter = model.active_adapter
    parameters = dict(model.named_parameters())
    weights = dict(weights)
    for name, kept in rank_pattern.items():
        module = name.replace(f".{adapter}", "").rsplit(".", 1)[0]  # "<module>.lora_E[.<adapter>]" -> "<module>"
        for matrix in ("lora_E", "lora_A", "lora_B"):
            key = f"base_model.model.{module}.{matrix}"
            full = torch.zeros_like(parameters[f"{key}.{adapter}"])
            mask = torch.tensor(kept, dtype=torch.bool, device=full.device)
            if matrix == "lora_B":
                full[:, mask] = weights[key].to(full)
            else:
                full[mask] = weights[key].to(full)
            weights[key] = full
    return weights


def _load_full_weights(model, checkpoint_dir: str) -> None:
    from safetensors.torch import load_file

    single = os.path.join(checkpoint_dir, "model.safetensors")
    if os.path.isfile(single):
        files = [single]
    else:
        files = sorted(glob.glob(os.path.join(checkpoint_dir, "model-*-of-*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no model.safetensors (or shards) to load")
    state_dict = {}
    for path in files:
        state_dict.update(load_file(path))
    result = model.load_state_dict(state_dict, strict=False)
    # safetensors drops tied copies (e.g. lm_head tied to the embedding); anything else missing is a real gap.
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or [])
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{checkpoint_dir}: weights do not match the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
