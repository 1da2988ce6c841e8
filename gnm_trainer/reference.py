"""The reference model p_ref (the model before unlearning) needed by `klr`, `klf` and `npo`: the model as it was
handed to the trainer.

- A base model with a `peft_config`: the PEFT model with its new adapter disabled, which is exactly the base model
  handed in, with no second copy of the weights.
- A `PeftModel` handed in (an adapter trained before, e.g. by TRL's `SFTTrainer` with a `peft_config`): a frozen copy
  of its adapter, added as a second adapter named `reference` (TRL's `ref_adapter_name`) and active only during the
  reference forward pass; the user's adapter is the one trained and saved. Disabling the adapter would instead give
  the model before that adapter's training.
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


def resolve_reference_mode(requested: str, loss_terms: list[str], is_peft: bool, adapter_handed_in: bool = False) -> str:
    """The reference strategy actually used: "reference_adapter" (a `PeftModel` handed in), "adapter_disabled" (a
    `peft_config`), "copy" or "none"."""
    from .errors import GNMInputError

    if not TERMS_NEEDING_REFERENCE.intersection(loss_terms):
        return "none"
    if requested == "auto":
        if adapter_handed_in:
            return "reference_adapter"
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
# The reference inside the PEFT model: adapter disabled, or the frozen copy of a trained adapter
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_ADAPTER = "reference"


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


def add_reference_adapter(peft_model) -> None:
    """Copy the active (trained) adapter of `peft_model` into a frozen adapter named `reference`, left inactive."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from .errors import GNMInputError

    if REFERENCE_ADAPTER in peft_model.peft_config:
        raise GNMInputError(
            f"model: it already has an adapter named {REFERENCE_ADAPTER!r}, the name GNMTrainer gives the frozen copy "
            "of the trained adapter; delete or rename it (or pass reference_model='copy')"
        )
    trained = peft_model.active_adapter
    config = copy.deepcopy(peft_model.peft_config[trained])
    config.inference_mode = True
    peft_model.add_adapter(REFERENCE_ADAPTER, config)
    weights = get_peft_model_state_dict(peft_model, adapter_name=trained)
    set_peft_model_state_dict(peft_model, weights, adapter_name=REFERENCE_ADAPTER)
    peft_model.set_requires_grad(REFERENCE_ADAPTER, requires_grad=False)


@contextlib.contextmanager
def reference_adapter_active(model: torch.nn.Module, peft_model):
    """Run `model` (possibly wrapped by DDP) with the `reference` adapter in place of the trained one, in eval mode.

    PEFT's `set_adapter` also sets `requires_grad`: frozen everywhere inside, the trained adapter alone trainable again
    on the way out (the graph of the policy forward pass, built before, is unaffected).
    """
    trained, was_training = peft_model.active_adapter, model.training
    model.eval()
    peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield model
    finally:
        peft_model.set_adapter(trained)
        model.train(was_training)


@contextlib.contextmanager
def reference_adapter_hidden(peft_model):
    """Save only the trained adapter: the `reference` copy is left out of `peft_config` while the body runs (PEFT's
    `save_pretrained` writes every adapter in it, the others in sub-folders)."""
    configs = getattr(peft_model, "peft_config", None)
    config = configs.pop(REFERENCE_ADAPTER, None) if isinstance(configs, dict) else None
    try:
        yield
    finally:
        if config is not None:
            peft_model.peft_config[REFERENCE_ADAPTER] = config


@contextlib.contextmanager
def reference_for(mode: str, model: torch.nn.Module, peft_model, reference_copy: torch.nn.Module | None):
    """The model that gives p_ref under `mode` (see `resolve_reference_mode`), for the body of the `with` block."""
    if mode == "copy":
        yield reference_copy
        return
    switch = reference_adapter_active if mode == "reference_adapter" else adapter_disabled
    with switch(model, peft_model) as reference:
        yield reference
