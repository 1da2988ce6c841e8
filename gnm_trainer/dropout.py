"""Dropout off in the trained model (`GNMConfig.disable_dropout`), as TRL's reference-based trainers do.

Models carry dropout in two forms: `nn.Dropout` modules (GPT-2's `attn_dropout`, PEFT's `lora_dropout`) and plain
float rates that the attention code passes to its kernel while training (Llama's and Phi's `attention_dropout`).
Both are set to 0. With dropout on, the policy's logits at step 1 differ from the reference's (so `klr` starts above
0 with a zero-initialised adapter) and packed and padded rows drop different units.
"""

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def disable_dropout(model: torch.nn.Module) -> float:
    """Set every dropout module's probability and every float dropout rate held by a module of `model` to 0; returns
    the largest rate that was set (0.0 when the model had none)."""
    largest = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            largest = max(largest, float(module.p))
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool) and value > 0:
                largest = max(largest, value)
                setattr(module, name, 0.0)
    return largest


def disable_dropout_and_say(model: torch.nn.Module) -> None:
    """`disable_dropout`, with one log line when it changed anything."""
    largest = disable_dropout(model)
    if largest > 0:
        logger.info(
            "disable_dropout: every dropout of the model set to 0 (largest rate was %g); pass disable_dropout=False "
            "(--disable_dropout false) to train with it", largest,
        )
