"""Per-document NLL without padding: documents packed end to end into rows, positions restarting per document.

transformers (5.x) builds a block-diagonal causal mask from `position_ids` when no 2-D attention mask and no cache
are passed (`masking_utils.find_packed_sequence_indices`, for sdpa, eager and flex attention, in any number of rows),
so a token attends only to the earlier tokens of its own document and its logits are those of the document alone, up
to the rounding of matrix products of another shape. FlashAttention runs its variable-length kernel only on a batch of
one row (`packed_forward.packs_into_one_row`): for it, the rows of one forward pass go end to end into a single row,
with the documents' bounds passed as its variable-length arguments (`data.packing.varlen_attention_kwargs`). Each
document's loss is then the mean cross-entropy of its next-token predictions, exactly what `model(ids, labels=ids).loss`
computes for it alone.

Row length is bounded (`max_row_tokens`): within a row, sdpa, eager and flex attention compute the whole row and mask
it, so a long row pays for attention scores between documents that are thrown away (FlashAttention's varlen kernel
computes none of them).
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.packing import first_fit_rows, varlen_attention_kwargs
from ..packed_forward import packs_into_one_row


def packed_inputs(rows: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, position_ids)` of shape (rows, widest row): each row's sequences end to end, positions counted
    from 0 in each. A row narrower than the widest ends with filler tokens (id 0) whose positions also restart at 0:
    a sequence of their own, which no other token attends to and whose loss nobody reads."""
    width = max(sum(len(sequence) for sequence in row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        tokens = [token for sequence in row for token in sequence]
        input_ids[index, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        filler = [width - len(tokens)] if width > len(tokens) else []
        position_ids[index] = torch.cat([torch.arange(n) for n in [len(sequence) for sequence in row] + filler])
    return input_ids, position_ids


def mean_next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, lengths: Sequence[int]) -> list[float]:
    """Mean next-token cross-entropy of each sequence of one packed row (`logits` (T, V), `input_ids` (T,)), as
    `model(ids, labels=ids).loss` computes it for the sequence alone; NaN for a one-token sequence, as there.

    Upcast to float32 one sequence at a time, so memory holds one sequence's logits in float32, not the row's."""
    losses, start = [], 0
    for length in lengths:
        predicted = logits[start : start + length - 1].float()  # token t predicts token t+1 of the same sequence
        targets = input_ids[start + 1 : start + length].to(predicted.device)
        losses.append(F.cross_entropy(predicted, targets).item())
        start += length
    return losses


@torch.no_grad()
def packed_document_nll(
    model,
    encoded: Sequence[Sequence[int]],
    max_row_tokens: int,
    rows_per_forward: int = 1,
    on_row: Callable[[int], None] | None = None,
) -> list[float]:
    """Mean token NLL of each tokenized document, in input order, computed in packed rows of at most `max_row_tokens`
    tokens (a longer document gets a row of its own), `rows_per_forward` rows at a time (end to end in one row when the
    model `packs_into_one_row`). `on_row(number of documents)` is called after each row."""
    losses: list[float] = [float("nan")] * len(encoded)
    device = next(model.parameters()).device
    rows = first_fit_rows([len(ids) for ids in encoded], max_row_tokens)
    batches = [rows[first : first + rows_per_forward] for first in range(0, len(rows), rows_per_forward)]
    one_row = packs_into_one_row(model)
    if one_row:
        batches = [[[index for row in batch for index in row]] for batch in batches]
    for batch in batches:
        input_ids, position_ids = packed_inputs([[encoded[i] for i in row] for row in batch])
        bounds = varlen_attention_kwargs([len(encoded[i]) for i in batch[0]], device) if one_row else {}
        # No attention mask and no cache: that is what makes transformers read the documents' bounds from position_ids.
        logits = model(
            input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False, **bounds
        ).logits
        for row_logits, row_ids, row in zip(logits, input_ids, batch):
            for index, loss in zip(row, mean_next_token_nll(row_logits, row_ids, [len(encoded[i]) for i in row])):
                losses[index] = loss
            if on_row is not None:
                on_row(len(row))
    return losses
