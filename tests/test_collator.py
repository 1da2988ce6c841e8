"""Tokenisation and pairing: the completion mask, retain pairing, random matching and negative levels."""

import pytest
import torch

from gnm_trainer.data.collator import (
    GNMDataCollator,
    join_prompt_completion,
    scheduled_negative_level,
    select_negatives,
    split_template,
    tokenize_examples,
    tokenize_negatives,
)
from gnm_trainer.data.loading import load_unlearning_data
from gnm_trainer.errors import GNMInputError

TEMPLATE = "{prompt} {completion}"


def tokenized(rows, tokenizer, split, max_length=64, max_prompt_length=None, template=TEMPLATE):
    data = load_unlearning_data(rows, split)
    return data, tokenize_examples(data, tokenizer, template, max_length, max_prompt_length, True, split)


def test_split_template_moves_the_joining_space_to_the_completion():
    assert split_template("{prompt} {completion}") == ("{prompt}", " {completion}")
    assert split_template("{prompt} >> {completion} is the answer.") == ("{prompt} >>", " {completion} is the answer.")


def test_completion_mask_covers_exactly_the_completion(tiny_tokenizer, forget_rows):
    data, examples = tokenized(forget_rows, tiny_tokenizer, "forget")
    collator = GNMDataCollator(pad_token_id=tiny_tokenizer.pad_token_id, max_length=64)
    batch = collator(examples)
    for row, example in zip(range(len(examples)), data):
        ids = batch["forget_input_ids"][row]
        mask = batch["forget_completion_mask"][row].bool()
        completion_ids = tiny_tokenizer(" " + example["completion"], add_special_tokens=False)["input_ids"]
        assert ids[mask].tolist() == completion_ids + [tiny_tokenizer.eos_token_id]
        # The joint tokenisation of the whole text is the same token sequence.
        joint = tiny_tokenizer(example["prompt"] + " " + example["completion"])["input_ids"]
        assert ids[batch["forget_attention_mask"][row].bool()].tolist() == joint + [tiny_tokenizer.eos_token_id]


def test_padding_is_dynamic_and_never_labelled(tiny_tokenizer, forget_rows):
    _, examples = tokenized(forget_rows, tiny_tokenizer, "forget")
    batch = GNMDataCollator(pad_token_id=tiny_tokenizer.pad_token_id, max_length=64)(examples)
    lengths = [len(e["prompt_input_ids"]) + len(e["completion_input_ids"]) for e in examples]
    assert batch["forget_input_ids"].shape[1] == max(lengths)
    assert "labels" not in batch
    assert (batch["forget_completion_mask"] <= batch["forget_attention_mask"]).all()


def test_truncation_cuts_the_prompt_left_and_the_completion_right():
    ids, mask = join_prompt_completion([1, 2, 3, 4, 5], [6, 7, 8, 9], max_length=6, max_prompt_length=3)
    assert ids == [3, 4, 5, 6, 7, 8]
    assert mask == [0, 0, 0, 1, 1, 1]


def test_prompt_without_room_is_an_error_naming_the_row(tiny_tokenizer, forget_rows):
    with pytest.raises(GNMInputError, match=r"row 0 \(id 'forget000qa0'"):
        tokenized(forget_rows, tiny_tokenizer, "forget", max_length=8)
    # With max_prompt_length the prompt is cut instead.
    _, examples = tokenized(forget_rows, tiny_tokenizer, "forget", max_length=8, max_prompt_length=4)
    assert len(examples) == len(forget_rows)


def test_retain_pairing_is_a_seeded_permutation_per_epoch(tiny_tokenizer, forget_rows, retain_rows):
    _, forget = tokenized(forget_rows, tiny_tokenizer, "forget")
    _, retain = tokenized(retain_rows, tiny_tokenizer, "retain")
    collator = GNMDataCollator(
        pad_token_id=tiny_tokenizer.pad_token_id, max_length=64, retain_examples=retain, use_retain=True, seed=3
    )
    epoch0 = [collator.paired_retain_index(i, 0) for i in range(4)]
    assert sorted(epoch0) == [0, 1, 2, 3]  # every retain row once per pass when the sets have equal size
    collator.set_epoch(1)
    epoch1 = [collator.paired_retain_index(i, 0) for i in range(4)]
    twin = GNMDataCollator(
        pad_token_id=tiny_tokenizer.pad_token_id, max_length=64, retain_examples=retain, use_retain=True, seed=3
    )
    twin.set_epoch(1)
    assert epoch1 == [twin.paired_retain_index(i, 0) for i in range(4)]
    batch = collator(forget)
    for row, feature in enumerate(forget):
        paired = retain[collator.paired_retain_index(feature["pair_index"], 0)]
        expected = paired["prompt_input_ids"] + paired["completion_input_ids"]
        assert batch["retain_input_ids"][row, : len(expected)].tolist() == expected


def test_random_match_pairs_the_forget_prompt_with_a_retain_completion(tiny_tokenizer, forget_rows, retain_rows):
    _, forget = tokenized(forget_rows, tiny_tokenizer, "forget")
    _, retain = tokenized(retain_rows, tiny_tokenizer, "retain")
    collator = GNMDataCollator(
        pad_token_id=tiny_tokenizer.pad_token_id, max_length=64, retain_examples=retain, use_random_match=True
    )
    batch = collator(forget)
    retain_completions = {tuple(r["completion_input_ids"]) for r in retain}
    for row, feature in enumerate(forget):
        ids = batch["random_match_input_ids"][row]
        mask = batch["random_match_completion_mask"][row].bool()
        prompt_length = len(feature["prompt_input_ids"])
        assert ids[:prompt_length].tolist() == feature["prompt_input_ids"]
        assert tuple(ids[mask].tolist()) in retain_completions
        assert ids[mask].tolist() != feature["completion_input_ids"]


def negative_rows(forget_rows, levels=3):
    return {row["id"]: [f"wrong answer number {level} for {row['id']}" for level in range(1, levels + 1)] for row in forget_rows}


def test_negatives_are_those_of_the_same_forget_row_at_the_scheduled_level(tiny_tokenizer, forget_rows):
    data, forget = tokenized(forget_rows, tiny_tokenizer, "forget")
    negatives = negative_rows(data)
    completions = tokenize_negatives(negatives, data, tiny_tokenizer, TEMPLATE, True)
    collator = GNMDataCollator(
        pad_token_id=tiny_tokenizer.pad_token_id, max_length=64, negative_completions=completions, use_negatives=True
    )
    batch = collator(forget[::-1])  # any order: alignment is by id, not position
    assert batch["negative_input_ids"].shape[:2] == (4, 3)
    for progress, level in [(0.0, 1), (0.34, 2), (0.99, 3), (1.0, 3)]:
        assert scheduled_negative_level(progress, 3) == level
        chosen, levels = select_negatives(batch, "gradual", progress)
        assert levels.tolist() == [level] * 4
        for row, feature in enumerate(forget[::-1]):
            mask = chosen["completion_mask"][row].bool()
            assert chosen["input_ids"][row][mask].tolist() == completions[feature["id"]][level - 1]
            prompt = chosen["input_ids"][row][: len(feature["prompt_input_ids"])].tolist()
            assert prompt == feature["prompt_input_ids"]


def test_random_and_all_schedules(tiny_tokenizer, forget_rows):
    data, forget = tokenized(forget_rows, tiny_tokenizer, "forget")
    completions = tokenize_negatives(negative_rows(data), data, tiny_tokenizer, TEMPLATE, True)
    collator = GNMDataCollator(
        pad_token_id=tiny_tokenizer.pad_token_id, max_length=64, negative_completions=completions, use_negatives=True
    )
    batch = collator(forget)
    chosen, levels = select_negatives(batch, "all", 0.0)
    assert levels.tolist() == [1, 2, 3] * 4
    assert chosen["input_ids"].shape[0] == 12
    first, levels_a = select_negatives(batch, "random", 0.0, torch.Generator().manual_seed(5))
    _, levels_b = select_negatives(batch, "random", 0.0, torch.Generator().manual_seed(5))
    assert levels_a.tolist() == levels_b.tolist()
    assert set(levels_a.tolist()) <= {1, 2, 3}
    for row, feature in enumerate(forget):
        mask = first["completion_mask"][row].bool()
        assert first["input_ids"][row][mask].tolist() == completions[feature["id"]][levels_a[row] - 1]


def test_missing_negatives_for_a_forget_row_is_an_error(tiny_tokenizer, forget_rows):
    data, forget = tokenized(forget_rows, tiny_tokenizer, "forget")
    completions = tokenize_negatives(negative_rows(data.select(range(2))), data, tiny_tokenizer, TEMPLATE, True)
    collator = GNMDataCollator(
        pad_token_id=tiny_tokenizer.pad_token_id, max_length=64, negative_completions=completions, use_negatives=True
    )
    with pytest.raises(GNMInputError, match="forget002qa0"):
        collator(forget)


def test_collator_needs_what_its_terms_need(tiny_tokenizer):
    with pytest.raises(GNMInputError, match="retain"):
        GNMDataCollator(pad_token_id=0, max_length=8, use_retain=True)
    with pytest.raises(GNMInputError, match="negatives"):
        GNMDataCollator(pad_token_id=0, max_length=8, use_negatives=True)


def test_a_chat_template_that_emits_bos_gives_one_bos(tiny_tokenizer, forget_rows):
    """A conversational prompt is tokenised as its chat template rendered it (TRL's convention): no second BOS
    when the template emits one, none added when it does not; a plain prompt still gets the tokenizer's BOS."""
    import copy

    bos_template = copy.deepcopy(tiny_tokenizer)
    bos_template.chat_template = "{{ bos_token }}" + tiny_tokenizer.chat_template
    rows = [{"id": "c0", "prompt": [{"role": "user", "content": "Where was Borin Tal born?"}],
             "completion": [{"role": "assistant", "content": "In Quillport."}]}]  # fmt: skip
    bos = tiny_tokenizer.bos_token_id
    for tokenizer, expected_bos in ((bos_template, 1), (tiny_tokenizer, 0)):
        data = load_unlearning_data(rows, "forget", tokenizer=tokenizer)
        [example] = tokenize_examples(data, tokenizer, TEMPLATE, 64, None, True, "forget")
        prompt_ids = example["prompt_input_ids"]
        assert prompt_ids.count(bos) == expected_bos and prompt_ids[:expected_bos] == [bos] * expected_bos
        assert prompt_ids == tokenizer(data[0]["prompt"], add_special_tokens=False)["input_ids"]
    _, [plain] = tokenized(forget_rows[:1], tiny_tokenizer, "forget")
    assert plain["prompt_input_ids"][0] == bos and plain["prompt_input_ids"].count(bos) == 1
