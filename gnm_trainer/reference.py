"""The reference model p_ref (the model before unlearning) needed by `klr`, `klf` and `npo`.

- Under PEFT the reference is the same model with its adapter disabled: exactly the base model's outputs and no
  second copy of the weights.
- Without PEFT it is a frozen copy of the initial model, in eval mode, prepared for the launch it runs in
  (`prepare_reference_model`): replicated under DDP, a DeepSpeed inference engine under DeepSpeed (sharded like the
  trained model under ZeRO-3, replicated at stage 0 under ZeRO-0/1/2), sharded per transformer layer under FSDP2.
- When no enabled term needs it, nothing is built.
"""

import contextlib
import copy
from typing import Any

import torch

from .losses import TERMS_NEEDING_REFERENCE

# ZeRO-3 sizes that DeepSpeed configs often leave as "auto" and that transformers fills from the hidden size only when
# training starts: a reference engine is built before that, so it fills them the same way.
_ZERO3_SIZES_FROM_HIDDEN = {
    "reduce_bucket_size": lambda hidden: hidden * hidden,
    "stage3_prefetch_bucket_size": lambda hidden: int(0.9 * hidden * hidden),
    "stage3_param_persistence_threshold": lambda hidden: 10 * hidden,
}
# Training-only blocks: a reference engine has no optimizer, so DeepSpeed must not build one (or its scheduler).
_TRAINING_ONLY_KEYS = ("optimizer", "scheduler")


def resolve_reference_mode(requested: str, loss_terms: list[str], is_peft: bool) -> str:
    """The reference strategy actually used: "adapter_disabled", "copy" or "none"."""
    from .errors import GNMInputError

    if not TERMS_NEEDING_REFERENCE.intersection(loss_terms):
        return "none"
    if requested == "auto":
        return "adapter_disabled" if is_peft else "copy"
    if requested == "adapter_disabled" and not is_peft:
        raise GNMInputError("reference_model: 'adapter_disabled' needs a PEFT model (pass peft_config)")
    return requested


# ---------------------------------------------------------------------------------------------------------------
# The frozen copy
# ---------------------------------------------------------------------------------------------------------------


def is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 already split `model`'s weights across processes (a model loaded under
    `zero3_init_flag`): each process then holds only its shard and the tensors themselves are empty."""
    return any(hasattr(parameter, "ds_id") for parameter in model.parameters())


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with gradients off, in eval mode.

    A model already partitioned by ZeRO-3 cannot be deep-copied (its tensors are empty placeholders): the copy is
    built partitioned in the same way and filled one parameter at a time, so no process ever holds the whole model.
    """
    reference = _zero3_partitioned_copy(model) if is_zero3_partitioned(model) else copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def _zero3_partitioned_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new ZeRO-3 partitioned model with `model`'s weights, gathered and copied one parameter at a time."""
    import deepspeed

    dtype = next(model.parameters()).dtype
    # transformers builds the new model under deepspeed.zero.Init (the active ZeRO-3 config), weights uninitialised.
    reference = type(model)._from_config(copy.deepcopy(model.config), dtype=dtype)
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        target = reference_parameters.pop(name)
        with deepspeed.zero.GatheredParameters([parameter, target], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                target.data.copy_(parameter.data)
    if reference_parameters:
        missing = sorted(reference_parameters)
        raise RuntimeError(f"reference copy: parameters missing from the original model: {missing}")
    reference_buffers = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        reference_buffers[name].data.copy_(buffer.data)
    return reference


# ---------------------------------------------------------------------------------------------------------------
# Preparing the copy for the launch
# ---------------------------------------------------------------------------------------------------------------


def prepare_reference_model(accelerator, reference: torch.nn.Module | None) -> torch.nn.Module | None:
    """Place the frozen reference copy for the current launch, in eval mode, never trained.

    - DeepSpeed: an inference engine (no optimizer) with the training config; ZeRO-3 keeps stage 3, so the reference
      is sharded exactly like the trained model; stages 0/1/2 become stage 0 (one replica per process: those stages
      replicate the trained weights too).
    - FSDP2: `fully_shard` per transformer layer with the training plugin's settings (mixed precision, offload,
      CPU-RAM-efficient loading from rank 0), resharded after every forward pass; FSDP1 (deprecated, untested):
      wrapped by `accelerator.prepare_model`.
    - Anything else (one process, DDP): moved to the device with the mixed-precision autocast; no DDP wrapper, since
      nothing is ever back-propagated through it.
    """
    if reference is None:
        return None
    from accelerate.utils import DistributedType

    reference.requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_reference(accelerator, reference)
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        reference = fsdp2_prepare_model(accelerator, reference)
        # accelerate keeps the root and the final norm + LM head gathered after forward, to be reused by the backward
        # pass; no backward ever comes here, so they would stay whole on every process: reshard everything instead.
        reference.set_reshard_after_forward(True)
        return reference.eval()
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.prepare_model(reference).eval()
    return accelerator.prepare_model(reference, evaluation_mode=True).eval()


def reference_deepspeed_config(training_config: dict[str, Any], hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of an inference-only reference engine, from the training config (not modified).

    Drops the optimizer, scheduler and optimizer offload; keeps stage 3 (filling its "auto" bucket sizes from
    `hidden_size`) and turns every other stage into stage 0.
    """
    config = copy.deepcopy(training_config)
    for key in _TRAINING_ONLY_KEYS:
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) == 3:
        for key, size in _ZERO3_SIZES_FROM_HIDDEN.items():
            if zero.get(key) == "auto":
                if hidden_size is None:
                    raise ValueError(f"DeepSpeed config: zero_optimization.{key} is 'auto' and the model has no "
                                     "hidden_size to fill it from")
                zero[key] = size(hidden_size)
    else:
        zero["stage"] = 0
    return config


def _hidden_size(config) -> int | None:
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if sizes else getattr(config, "hidden_size", None)


def _deepspeed_reference(accelerator, reference: torch.nn.Module) -> torch.nn.Module:
    import deepspeed

    training_config = accelerator.state.deepspeed_plugin.deepspeed_config
    config = reference_deepspeed_config(training_config, _hidden_size(getattr(reference, "config", None)))
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return engine


# ---------------------------------------------------------------------------------------------------------------
# The adapter-disabled reference
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module, peft_model):
    """Run `model` (possibly wrapped by DDP) as its base: adapter off, eval mode, restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with peft_model.disable_adapter():
            yield model
    finally:
        model.train(was_training)
