"""Helpers for multi-process launches (`accelerate launch`, `torchrun`): CPU-only machines and shard accounting.

On a machine without any accelerator, a multi-process launch needs one setting that nothing supplies by itself:
- plain data parallel (and FSDP, which falls back to it on CPU) needs `use_cpu=True`, or every process quietly
  trains alone on its own data shard, all writing the same output folder;
- DeepSpeed needs the `gloo` backend (`ddp_backend="gloo"`), or accelerate counts one process while DeepSpeed counts
  them all and its batch-size check fails; `use_cpu=True` would silently turn DeepSpeed off.
`cpu_launch_overrides` says which, from the launcher's environment variables.
"""

import os
from collections.abc import Mapping
from typing import Any

import torch


def launched_processes(environ: Mapping[str, str] | None = None) -> int:
    """Number of processes the launcher started (1 when not launched in parallel)."""
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1") or 1)


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator on this machine."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def cpu_launch_overrides(
    environ: Mapping[str, str] | None = None, accelerator_available: bool | None = None
) -> dict[str, Any]:
    """TrainingArguments values a multi-process launch on a CPU-only machine needs ({} when none is needed)."""
    environ = os.environ if environ is None else environ
    if launched_processes(environ) < 2:
        return {}
    if accelerator_available is None:
        accelerator_available = has_accelerator()
    if accelerator_available:
        return {}
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"ddp_backend": "gloo"}
    return {"use_cpu": True}


def apply_cpu_launch_defaults(training_args) -> dict[str, Any]:
    """Set `cpu_launch_overrides` on `training_args` where the user left the default; returns what was set.

    Must run before `TrainingArguments.__post_init__` sets up the processes (e.g. at the start of a subclass's
    `__post_init__`), since the process group is created there.
    """
    applied = {}
    for name, value in cpu_launch_overrides().items():
        if getattr(training_args, name) in (None, False):
            setattr(training_args, name, value)
            applied[name] = value
    return applied


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(elements held by this process, elements of the whole model) over `model`'s parameters.

    Counts a DeepSpeed ZeRO-3 parameter by its local partition and an FSDP2 (DTensor) parameter by its local shard,
    so that a sharded model shows about 1/N of its size on each of N processes.
    """
    local, total = 0, 0
    for parameter in _parameters_of(model):
        if hasattr(parameter, "ds_tensor"):
            local += parameter.ds_tensor.numel()
            total += parameter.ds_numel
        elif hasattr(parameter, "to_local"):
            local += parameter.to_local().numel()
            total += parameter.numel()
        else:
            local += parameter.numel()
            total += parameter.numel()
    return local, total


def launch_report(trainer) -> dict[str, Any]:
    """What this process of a `GNMTrainer` run holds: its rank, the number of processes and distributed type
    accelerate set up, the DeepSpeed ZeRO stage, and for the trained model and the reference model the parameter
    elements held here against the whole model's (`parameter_counts`). For logs, tests and benchmarks."""
    state = trainer.accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    reference = trainer.ref_model
    reference_local, reference_total = parameter_counts(reference) if reference is not None else (0, 0)
    model_local, model_total = parameter_counts(trainer.model_wrapped)
    return {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "fsdp_version": getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None),
        "zero3_init": _zero3_init_enabled(),
        "reference_mode": trainer.reference_mode,
        "reference_type": type(reference).__name__ if reference is not None else None,
        # a DeepSpeed engine's own `training` flag never changes: its eval() sets the wrapped module's
        "reference_training": getattr(reference, "module", reference).training if reference is not None else None,
        "reference_local_elements": reference_local,
        "reference_total_elements": reference_total,
        "model_local_elements": model_local,
        "model_total_elements": model_total,
    }


def _zero3_init_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def saves_sharded_only(trainer) -> bool:
    """Whether the Trainer's final `save_model` would write no weights: under FSDP with a SHARDED_STATE_DICT, the
    Trainer writes sharded weights into checkpoints only, and nothing into the output folder."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return bool(trainer.is_fsdp_enabled and plugin is not None and "SHARDED" in str(plugin.state_dict_type))


def save_full_weights(trainer, output_dir: str) -> None:
    """Gather the full weights of a sharded model (every process must call this) and write them as an unsharded
    `save_model` would (full model, or the PEFT adapter), plus the tokenizer, from the main process."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # the DeepSpeed engine, when there is one
    if trainer.args.should_save:
        trainer._save(output_dir, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()


def _parameters_of(model: torch.nn.Module):
    module = getattr(model, "module", model)  # a DeepSpeed engine or DDP wrapper holds the model in `.module`
    return list(module.parameters())
