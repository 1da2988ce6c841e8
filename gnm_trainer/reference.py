"""The reference model p_ref (the model before unlearning) needed by `klr`, `klf` and `npo`.

- Under PEFT the reference is the same model with its adapter disabled: exactly the base model's outputs and no
  second copy of the weights.
- Without PEFT it is a frozen copy of the initial model, in eval mode.
- When no enabled term needs it, nothing is built.
"""

import contextlib
import copy

import torch

from .losses import TERMS_NEEDING_REFERENCE


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


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with gradients off, in eval mode."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


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
