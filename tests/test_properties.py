"""Property tests: the loader on random texts, and the collator's masks, padding and truncation on random pairs."""

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gnm_trainer.data import load_unlearning_data
from gnm_trainer.data.collator import (
    GNMDataCollator,
    render_completion,
    render_prompt,
    tokenize_completion,
    tokenize_prompt,
    truncate_prompt,
)
from gnm_trainer.errors import GNMInputError

TEMPLATE = "{prompt} {completion}"
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any unicode text, sometimes very long (a random chunk repeated up to 400 times).
texts = st.one_of(st.text(max_size=60), st.builds(lambda chunk, times: chunk * times, st.text(min_size=1, max_size=8), st.integers(1, 400)))
# Words the tiny tokenizer knows, plus characters it does not.
words = st.text(alphabet="abcdefghilmnorstuvwyAB .,?-0123456789é水", min_size=0, max_size=80)


def is_valid_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


@FEW
@given(rows=st.lists(st.tuples(texts, texts), min_size=1, max_size=4))
def test_loader_keeps_valid_texts_and_names_the_first_bad_row(rows):
    raw = [{"id": f"forget{i:03d}qa0", "input": prompt, "output": completion} for i, (prompt, completion) in enumerate(rows)]
    bad_rows = [i for i, (prompt, completion) in enumerate(rows) if not (is_valid_text(prompt) and is_valid_text(completion))]
    if bad_rows:
        with pytest.raises(GNMInputError, match=f"row {bad_rows[0]}, field '(input|output)'"):
            load_unlearning_data(raw)
        return
    loaded = load_unlearning_data(raw)
    assert loaded["prompt"] == [prompt for prompt, _ in rows]  # normalising never alters a valid text
    assert loaded["completion"] == [completion for _, completion in rows]
    assert set(loaded["kind"]) == {"qa"} and loaded["chat"] == [False] * len(rows)


@FEW
@given(index=st.integers(0, 3), field=st.sampled_from(["input", "output"]), value=st.sampled_from([None, "", " \n\t", 3, 1.5]))
def test_loader_names_the_row_and_field_of_a_none_empty_or_non_string_text(index, field, value):
    raw = [{"id": f"r{i}", "input": "a question", "output": "an answer"} for i in range(4)]
    raw[index][field] = value
    with pytest.raises(GNMInputError, match=f"forget rows, row {index}, field '{field}'"):
        load_unlearning_data(raw)


@FEW
@given(
    pairs=st.lists(st.tuples(words, words), min_size=1, max_size=4),
    max_length=st.integers(2, 48),
    prompt_share=st.one_of(st.none(), st.floats(0.0, 1.0)),
)
def test_collator_masks_exactly_the_kept_completion_and_pads_on_the_right(tiny_tokenizer, pairs, max_length, prompt_share):
    max_prompt_length = None if prompt_share is None else max(1, min(max_length - 1, round(prompt_share * max_length)))
    features = []
    for index, (prompt, completion) in enumerate(pairs):
        prompt_ids = tokenize_prompt(tiny_tokenizer, render_prompt(prompt, TEMPLATE, False))
        completion_ids = tokenize_completion(tiny_tokenizer, render_completion(completion, TEMPLATE, False), True)
        features.append({"id": str(index), "pair_index": index, "prompt_input_ids": prompt_ids, "completion_input_ids": completion_ids})
    # Rows without room for one completion token are rejected before the collator (tested in test_bad_input.py).
    assume(all(max_length - len(truncate_prompt(f["prompt_input_ids"], max_prompt_length)) >= 1 for f in features))
    pad_id = tiny_tokenizer.pad_token_id
    batch = GNMDataCollator(pad_token_id=pad_id, max_length=max_length, max_prompt_length=max_prompt_length)(features)
    input_ids, attention, completion_mask = (batch[f"forget_{key}"] for key in ("input_ids", "attention_mask", "completion_mask"))
    assert input_ids.shape == attention.shape == completion_mask.shape and input_ids.shape[0] == len(features)
    assert input_ids.shape[1] <= max_length
    for row, feature in enumerate(features):
        prompt_ids = truncate_prompt(feature["prompt_input_ids"], max_prompt_length)
        kept_completion = feature["completion_input_ids"][: max_length - len(prompt_ids)]
        length = len(prompt_ids) + len(kept_completion)
        assert int(completion_mask[row].sum()) == len(kept_completion) >= 1
        assert input_ids[row, :length].tolist() == prompt_ids + kept_completion
        assert completion_mask[row, :length].tolist() == [0] * len(prompt_ids) + [1] * len(kept_completion)
        assert attention[row].tolist() == [1] * length + [0] * (input_ids.shape[1] - length)  # right padding
        assert input_ids[row, length:].eq(pad_id).all() and completion_mask[row, length:].eq(0).all()
