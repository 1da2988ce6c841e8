"""The packed layout on its own: rows, position ids, where the losses read logits, and what a model makes of it."""

import pytest
import torch

from gnm_trainer import losses
from gnm_trainer.data.packing import first_fit_rows, pack_groups, padded_loss_positions, split_per_group

PAD = 0


def padded_group(sequences, prompt_lengths):
    """A right-padded group (input_ids, attention_mask, completion_mask) as the collator makes it."""
    length = max(len(s) for s in sequences)
    group = {key: torch.zeros(len(sequences), length, dtype=torch.long) for key in losses_keys()}
    for row, (ids, prompt) in enumerate(zip(sequences, prompt_lengths)):
        group["input_ids"][row, : len(ids)] = torch.tensor(ids)
        group["attention_mask"][row, : len(ids)] = 1
        group["completion_mask"][row, prompt : len(ids)] = 1
    return group


def losses_keys():
    return ("input_ids", "attention_mask", "completion_mask")


def test_first_fit_places_longest_first_into_the_first_row_with_room():
    assert first_fit_rows([3, 5, 2, 4], 8) == [[1, 0], [3, 2]]
    assert first_fit_rows([9, 2], 8) == [[0], [1]]  # longer than the bound: a row of its own
    assert first_fit_rows([2, 2, 2], 100) == [[0, 1, 2]]


def test_packed_rows_hold_every_token_once_with_restarting_positions():
    forget = padded_group([[11, 12, 13, 14], [21, 22]], [2, 1])
    retain = padded_group([[31, 32, 33, 34, 35]], [3])
    packed = pack_groups([forget, retain], max_packed_length=6, pad_token_id=PAD)
    # lengths 4, 2, 5: first fit (longest first) gives rows [5], [4, 2]
    assert packed.rows_of_sequences == [[2], [0, 1]]
    assert packed.input_ids.tolist() == [[31, 32, 33, 34, 35, PAD], [11, 12, 13, 14, 21, 22]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 1]]
    assert set(packed.model_inputs()) == {"input_ids", "position_ids"}  # no attention mask: it would hide the packing
    # The logits at loss_positions predict the completion tokens in sequence order (forget 0, forget 1, retain 0).
    flat_ids = packed.input_ids.reshape(-1)
    predicted = flat_ids[packed.loss_positions + 1]
    targets = torch.cat([losses.completion_targets(g["input_ids"], g["completion_mask"])[0] for g in (forget, retain)])
    assert predicted.tolist() == targets.tolist() == [13, 14, 22, 34, 35]
    assert packed.loss_positions.tolist() == [7, 8, 10, 2, 3]


def test_a_sequence_longer_than_the_bound_sets_the_row_length():
    """Rows are padded to the longest row: up to the longest sequence, filling them is free."""
    group = padded_group([list(range(1, 10)), list(range(1, 6)), list(range(1, 5))], [1, 1, 1])
    packed = pack_groups([group], max_packed_length=8, pad_token_id=PAD)
    assert packed.rows_of_sequences == [[0], [1, 2]] and packed.input_ids.shape == (2, 9)
    assert pack_groups([group], max_packed_length=20, pad_token_id=PAD).rows_of_sequences == [[0, 1, 2]]


def test_padded_loss_positions_are_the_completion_positions_in_sequence_order():
    group = padded_group([[11, 12, 13, 14], [21, 22]], [2, 1])
    positions = padded_loss_positions(group["completion_mask"])
    assert positions.tolist() == [1, 2, 4]  # (row 0, t 1), (row 0, t 2), (row 1, t 0) of a (2 × 4) batch
    targets, sequence_index = losses.completion_targets(group["input_ids"], group["completion_mask"])
    assert group["input_ids"].reshape(-1)[positions + 1].tolist() == targets.tolist() == [13, 14, 22]
    assert sequence_index.tolist() == [0, 0, 1]


def test_split_per_group_undoes_the_concatenation():
    forget, retain = split_per_group(torch.arange(5.0), [2, 3])
    assert forget.tolist() == [0.0, 1.0] and retain.tolist() == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention"])
def test_a_packed_forward_gives_each_sequence_its_padded_logits(tiny_tokenizer, attention):
    """transformers builds the block-diagonal causal mask from the restarting position ids (no 2-D mask): every
    sequence's logits equal those of its padded forward; with an all-ones mask the sequences would see each other."""
    from gnm_trainer.target import build_tiny_llama

    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    model.set_attn_implementation(attention)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (12, 5, 9, 3, 7)]
    group = padded_group(sequences, [2, 1, 4, 1, 3])
    packed = pack_groups([group], max_packed_length=16, pad_token_id=PAD)
    assert len(packed.rows_of_sequences) < len(sequences)  # several sequences share a row
    with torch.no_grad():
        padded_logits = model(input_ids=group["input_ids"], attention_mask=group["attention_mask"]).logits
        packed_logits = model(**packed.model_inputs(), use_cache=False).logits
        leaking = model(**packed.model_inputs(), attention_mask=torch.ones_like(packed.input_ids), use_cache=False).logits
    vocab = padded_logits.shape[-1]
    expected = padded_logits.reshape(-1, vocab)[padded_loss_positions(group["completion_mask"])]
    torch.testing.assert_close(packed_logits.reshape(-1, vocab)[packed.loss_positions], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(leaking.reshape(-1, vocab)[packed.loss_positions], expected, atol=1e-3)
