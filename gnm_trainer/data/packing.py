"""Padding-free layout: the sequences of a step concatenated into a few rows, and where their losses read logits.

The collator pads each group (forget, retain, random match, negatives) to its longest sequence; `pack_groups` drops
that padding and places the sequences first-fit into rows of at most `max_packed_length` tokens, with `position_ids`
restarting at 0 for each sequence. Given `position_ids` and no 2-D attention mask, transformers builds the
block-diagonal causal mask itself for sdpa, eager and flex attention, in any number of rows
(`masking_utils.find_packed_sequence_indices`), so a sequence sees only its own tokens, as it does padded.
FlashAttention reads the sequence bounds from `position_ids` only when the batch is ONE row (it then runs its
variable-length kernel); given several rows it attends over each whole row, across its sequences. For it,
`one_row=True` puts all the sequences end to end in a single row and passes their bounds as FlashAttention's
variable-length arguments, as TRL's padding-free collator does (`packed_forward.packs_into_one_row` says when). The
explicit bounds also serve models that do not hand `position_ids` down to their attention layers (GPTBigCode).

Both layouts, packed and padded, name the positions whose logits predict a completion token by flat indices into
(rows × length), in *sequence order*: every token of sequence 0, then of sequence 1, and so on over the groups in the
order given. Logits taken at those positions line up token for token with `losses.completion_targets`, whatever the
layout, so the loss math never sees the layout.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..losses import completion_positions

# The most tokens in one packed row when `GNMConfig.max_packed_length` is unset (measured: docs/performance.md,
# "Packed rows").
DEFAULT_MAX_PACKED_LENGTH = 512


@dataclass
class PackedRows:
    """Sequences packed into rows: what the model is called with, and where the losses read its logits."""

    input_ids: torch.Tensor  # (rows, length), filler at the end of a row is `pad_token_id`
    position_ids: torch.Tensor  # (rows, length), restarting at 0 for every sequence (filler: 0)
    loss_positions: torch.Tensor  # (N,) flat indices into (rows × length), in sequence order
    rows_of_sequences: list[list[int]]  # the sequences (indices over all groups) of each row, in row order
    varlen_kwargs: dict = field(default_factory=dict)  # `varlen_attention_kwargs` of a single row, else empty

    def model_inputs(self) -> dict:
        """Keyword arguments of the model's forward: no attention mask (it would turn the packed detection off)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, **self.varlen_kwargs}


def varlen_attention_kwargs(lengths: Sequence[int], device=None) -> dict:
    """FlashAttention's variable-length arguments for sequences of `lengths` end to end in one row: transformers hands
    them to its varlen kernel as they are (`_flash_attention_forward`), whether or not the model passes `position_ids`
    down to its attention layers. The names are those of transformers' `FlashAttentionKwargs`."""
    bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    longest = max(lengths)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def first_fit_rows(lengths: Sequence[int], max_packed_length: int) -> list[list[int]]:
    """Indices of `lengths` placed into rows of at most `max_packed_length` tokens, longest first, each into the first
    row with room (first-fit decreasing). A sequence longer than the bound gets a row of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_packed_length - lengths[index])
    return rows


def pack_groups(
    groups: Sequence[dict[str, torch.Tensor]], max_packed_length: int, pad_token_id: int, one_row: bool = False
) -> PackedRows:
    """Pack the sequences of right-padded groups (`input_ids`, `attention_mask`, `completion_mask`, each (B, T)).

    Rows hold at most `max_packed_length` tokens, or as many as the longest sequence when it is longer (rows are padded
    to a common length anyway); with `one_row`, all of them go end to end into a single row, whatever its length, with
    their `varlen_attention_kwargs`. Sequences are numbered over the groups in order (group 0's rows first); that
    numbering is the sequence order of `loss_positions`.
    """
    lengths = torch.cat([g["attention_mask"].sum(-1) for g in groups])
    tokens = torch.cat([g["input_ids"][g["attention_mask"].bool()] for g in groups])
    # True on each token that a loss predicts: a completion token after the sequence's first token.
    predicted = torch.cat(
        [F.pad(completion_positions(g["completion_mask"]), (1, 0))[g["attention_mask"].bool()] for g in groups]
    )
    lengths_list = lengths.tolist()
    if one_row:
        rows = [list(range(len(lengths_list)))]
    else:  # every row is as long as the longest one: up to the longest sequence, filling rows costs no extra position
        rows = first_fit_rows(lengths_list, max(max_packed_length, *lengths_list))
    length = max(sum(lengths_list[i] for i in row) for row in rows)

    # Where each sequence starts in the flat (rows × length) layout and in the concatenated tokens.
    destination_start = [0] * len(lengths_list)
    for row_index, row in enumerate(rows):
        offset = row_index * length
        for sequence in row:
            destination_start[sequence] = offset
            offset += lengths_list[sequence]
    device = tokens.device
    source_start = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(len(tokens), device=device) - torch.repeat_interleave(source_start, lengths)
    destination = torch.repeat_interleave(torch.tensor(destination_start, device=device), lengths) + within

    input_ids = torch.full((len(rows) * length,), pad_token_id, dtype=tokens.dtype, device=device)
    input_ids[destination] = tokens
    position_ids = torch.zeros(len(rows) * length, dtype=torch.long, device=device)
    position_ids[destination] = within
    # The token at `destination` is predicted by the logit one position before it, in the same sequence.
    loss_positions = destination[predicted.bool()] - 1
    varlen_kwargs = varlen_attention_kwargs(lengths_list, device) if one_row else {}
    return PackedRows(
        input_ids.view(len(rows), length), position_ids.view(len(rows), length), loss_positions, rows, varlen_kwargs
    )


def padded_loss_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """The padded layout's counterpart of `PackedRows.loss_positions`: flat indices into (B × T) of the logits that
    predict a completion token, in sequence order."""
    positions = F.pad(completion_positions(completion_mask), (0, 1))
    return positions.reshape(-1).nonzero().squeeze(-1)


def split_per_group(values: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Per-sequence (or per-token) values over all groups, cut back into one tensor per group."""
    return list(torch.split(values, list(sizes)))
