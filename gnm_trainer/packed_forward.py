"""The model side of padding-free training: whether a model can run packed rows, whether they must be one row
(FlashAttention), and logits only where a loss reads.

Below the trainer (evaluation can use it too); the layout itself is `data/packing.py`.
"""

import contextlib
import inspect
import re
import sys

import torch
from transformers.utils import logging

from .errors import GNMInputError
from .modeling import is_peft_model

logger = logging.get_logger(__name__)

# Attention implementations that take the sequence boundaries from packed `position_ids`: masking_utils builds the
# block-diagonal mask for the first three, in any number of rows; FlashAttention runs its variable-length kernel, but
# only on a batch of one row (`packs_into_one_row`).
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# A model's code hands `position_ids` to masking_utils' mask builder: a call with `position_ids=` or a kwargs dict.
_MASK_TAKES_POSITIONS = re.compile(
    r"(?:create_\w*mask|mask_function)\((?:[^()]|\([^()]*\))*?\bposition_ids\s*=|[\"']position_ids[\"']\s*:\s*position_ids",
    re.S,
)


def _base_model(model):
    return model.get_base_model() if is_peft_model(model) else model


def packing_unsupported_reason(model) -> str | None:
    """Why `model` cannot train on packed rows (None when it can). Read from the model's class, code and config
    only, never from data: every process decides the same."""
    base = _base_model(model)
    config = base.config
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    if base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no output embeddings (LM head)"
    if not getattr(base, "_supports_attention_backend", False):  # e.g. older remote code with its own attention
        return f"{type(base).__name__} does not use transformers' attention interface"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in PACKED_ATTENTION:
        return f"its attention implementation {implementation!r} ignores packed position_ids"
    if not _MASK_TAKES_POSITIONS.search(inspect.getsource(sys.modules[type(base).__module__])):
        return f"{type(base).__name__} builds its attention mask without position_ids"
    return None


def packs_into_one_row(model) -> bool:
    """Whether `model`'s packed sequences must all go into ONE row. FlashAttention (transformers 5,
    `modeling_flash_attention_utils._is_packed_sequence`) reads the sequence bounds from `position_ids` only in a
    batch of one row; given several rows it runs causal attention over each whole row, so a sequence would attend to
    the sequences before it. Read from the model's config only: every process decides the same."""
    implementation = getattr(_base_model(model).config, "_attn_implementation", None) or ""
    return "flash" in implementation  # transformers' own test (`utils.generic.is_flash_attention_requested`)


def resolve_padding_free(padding_free: bool | None, model) -> bool:
    """`GNMConfig.padding_free` for this model: `None` packs when the model supports it and says once when not."""
    if padding_free is False:
        return False
    reason = packing_unsupported_reason(model)
    if reason is None:
        return True
    if padding_free:
        raise GNMInputError(f"padding_free: True, but this model cannot train on packed sequences: {reason}")
    logger.warning("padding_free: the model cannot train on packed sequences (%s); padding each batch instead", reason)
    return False


@contextlib.contextmanager
def logits_only_at(model, positions: torch.Tensor):
    """Within the block, the LM head of `model` projects only the final hidden states at `positions` (flat indices
    into rows × length): the forward returns logits (N, vocab), in the order of `positions`.

    A pre-hook on the output embeddings, so the call still goes through the wrapped model (DDP, DeepSpeed and FSDP
    hooks run) while the vocabulary-sized logits, most of a step's memory, cover only what a loss reads.
    """

    def select(_module, args):
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1])[positions], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()
