"""Gradual negatives: the perturb and LLM backends, the store and its check, resume, and `gnm negatives`."""

import json
import os
import re

import pytest
from conftest import LUME_DIR
from rouge_score import rouge_scorer

from gnm_trainer.cli import main as gnm_main
from gnm_trainer.errors import GNMInputError
from gnm_trainer.negatives import (
    NEGATIVE_FIELDS,
    build_negatives,
    check_negatives,
    completion_hash,
    find_items,
    generate_llm_negatives,
    partial_path,
    perturb_negatives,
    read_negatives,
    write_negatives,
)
from gnm_trainer.negatives import build as build_module
from gnm_trainer.negatives.perturb import STOPWORDS, level_schedule, rouge_tokens

SHORT_TEMPLATE = "Q: {prompt} A: {previous} Wrong:"
PII_ROWS = [
    {
        "id": "pii0sc1",
        "input": "Nia Volk was born on March 3, 1979. She",
        "output": "can be reached at 415-555-2671 or nia.volk@example.com. Her SSN is 987-65-4320 and "
        "she moved to Port Elwin with Ada Brenn on 2001-07-14.",
    },
    {"id": "pii0qa0", "input": "What is the birth date of Nia Volk?", "output": "1979-03-03"},
    {"id": "pii0qa1", "input": "What is Nia Volk's Social Security Number?", "output": "987654320"},
    {"id": "pii0qa2", "input": "What is Nia Volk's phone number?", "output": "4155552671"},
    {"id": "pii0qa3", "input": "What is Nia Volk's email address?", "output": "nia.volk@example.com"},
    {"id": "pii1sc1", "input": "Contact", "output": "Orrin Pell at (212) 555-0148, born June 9, 1961."},
]
PII_FACTS = {  # id -> (kind, text) of the typed facts that level K must remove
    "pii0sc1": [("phone", "415-555-2671"), ("email", "nia.volk@example.com"), ("ssn", "987-65-4320"),
                ("date", "2001-07-14"), ("name", "Port Elwin"), ("name", "Ada Brenn")],
    "pii0qa0": [("date", "1979-03-03")],
    "pii0qa1": [("ssn", "987654320")],
    "pii0qa2": [("phone", "4155552671")],
    "pii0qa3": [("email", "nia.volk@example.com")],
    "pii1sc1": [("name", "Orrin Pell"), ("phone", "(212) 555-0148"), ("date", "June 9, 1961")],
}  # fmt: skip


STOPWORD_TOKENS = {token for word in STOPWORDS for token in rouge_tokens(word)}


def read_jsonl(path, limit=None):
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[:limit] if limit else rows


@pytest.fixture(scope="module")
def varied_rows():
    """Forget rows of every kind: the PII rows, synthetic rows of the three tasks, and LUME rows of the three tasks
    when the data is there (so the tests exercise the same cases with or without it)."""
    from gnm_trainer.data.synthetic import make_synthetic_lume

    rows = list(PII_ROWS) + make_synthetic_lume(seed=3)["forget_train"][:24]
    lume = os.path.join(LUME_DIR, "forget_train.jsonl")
    if os.path.isfile(lume):
        lume_rows = read_jsonl(lume)
        for task in ("Task1", "Task2", "Task3"):
            rows += [row for row in lume_rows if row["task"] == task][:12]
    return rows


@pytest.fixture(scope="module")
def pool_rows():
    from gnm_trainer.data.synthetic import make_synthetic_lume

    lume = os.path.join(LUME_DIR, "retain_train.jsonl")
    return read_jsonl(lume, limit=200) if os.path.isfile(lume) else make_synthetic_lume(seed=3)["retain_train"]


def by_id(negatives):
    grouped = {}
    for row in negatives:
        grouped.setdefault(row["id"], []).append(row)
    return grouped


# ---------------------------------------------------------------------------------------------------------------
# perturb
# ---------------------------------------------------------------------------------------------------------------


def test_perturb_is_deterministic_given_the_seed(forget_rows, retain_rows):
    first = perturb_negatives(forget_rows, retain_rows, levels=3, seed=7)
    assert first == perturb_negatives(forget_rows, retain_rows, levels=3, seed=7)
    assert first != perturb_negatives(forget_rows, retain_rows, levels=3, seed=8)
    # A row's negatives do not depend on the other rows (what resume and sharding rely on).
    assert perturb_negatives(forget_rows[2:3], retain_rows, levels=3, seed=7) == first[6:9]


@pytest.mark.parametrize("levels", [1, 3, 6])
def test_perturb_levels_are_distinct_and_fall_in_rouge(varied_rows, pool_rows, levels):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    negatives = by_id(perturb_negatives(varied_rows, pool_rows, levels=levels, seed=0))
    for row in varied_rows:
        texts = [negative["completion"] for negative in negatives[row["id"]]]
        assert [negative["level"] for negative in negatives[row["id"]]] == list(range(1, levels + 1))
        assert len(set(texts)) == levels and row["output"] not in texts, texts
        recalls = [scorer.score(row["output"], text)["rougeL"].recall for text in texts]
        assert all(later <= earlier for earlier, later in zip(recalls, recalls[1:])), (row["id"], recalls)
        # Monotone: the truth's tokens kept at level k were kept at level k-1 too.
        kept = [rouge_tokens(text) & rouge_tokens(row["output"]) for text in texts]
        assert all(later <= earlier for earlier, later in zip(kept, kept[1:]))
        # Level K keeps none of the truth's content tokens (stopwords and a possessive 's' may stay).
        assert not (kept[-1] - STOPWORD_TOKENS - {"s"}), (row["id"], kept[-1])


def test_perturb_replaces_typed_facts_with_values_of_the_same_type(pool_rows):
    negatives = by_id(perturb_negatives(PII_ROWS, pool_rows, levels=4, seed=3))
    for row_id, facts in PII_FACTS.items():
        final = negatives[row_id][-1]["completion"]
        found = find_items(final)
        for kind, text in facts:
            assert text not in final, (row_id, text, final)
            assert kind in {item.kind for item in found}, (row_id, kind, final)
    # Digits keep their shape: a phone stays a phone of the same pattern.
    assert re.fullmatch(r"\d{10}", negatives["pii0qa2"][-1]["completion"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", negatives["pii0qa0"][-1]["completion"])


def test_perturb_finds_the_facts_of_a_pii_row():
    kinds = {(item.kind, item.text) for item in find_items(PII_ROWS[0]["output"])}
    assert set(PII_FACTS["pii0sc1"]) <= kinds
    assert ("word", "moved") in kinds and not any(text == "she" for _, text in kinds)


def test_few_items_still_give_distinct_levels(retain_rows):
    rows = [{"id": "a", "prompt": "When?", "completion": "1987"}, {"id": "b", "prompt": "Say", "completion": "..."}]
    negatives = by_id(perturb_negatives(rows, retain_rows, levels=5, seed=0))
    years = [row["completion"] for row in negatives["a"]]
    assert len(set(years)) == 5 and all(re.fullmatch(r"\d{4}", year) and year != "1987" for year in years)
    assert len({row["completion"] for row in negatives["b"]}) == 5
    assert level_schedule(2, 4) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert level_schedule(8, 4) == [(2, 0), (4, 0), (6, 0), (8, 0)]


def test_perturb_rows_carry_provenance(forget_rows):
    negatives = perturb_negatives(forget_rows, levels=2, seed=5)
    assert len(negatives) == 2 * len(forget_rows)
    for forget, negative in zip([row for row in forget_rows for _ in range(2)], negatives):
        assert list(negative) == list(NEGATIVE_FIELDS)
        assert negative["id"] == forget["id"] and negative["source_hash"] == completion_hash(forget["output"])
        assert (negative["backend"], negative["generator"], negative["prompt_template"]) == ("perturb", "", "")
        assert negative["seed"] == 5 and negative["fallback"] is False


# ---------------------------------------------------------------------------------------------------------------
# llm
# ---------------------------------------------------------------------------------------------------------------


class EchoGenerator:
    """A fake generator that always answers with the text it was asked to rewrite: every output is degenerate."""

    name_or_path = "echo"

    def __init__(self, tokenizer):
        import torch

        self.tokenizer = tokenizer
        self.weight = torch.zeros(1)
        self.calls = []

    def parameters(self):
        yield self.weight

    def eval(self):
        return self

    def to(self, device):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, logits_processor=None, **kwargs):
        import torch

        self.calls.append((len(input_ids), logits_processor is not None))
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            previous = re.search(r"A: (.*) Wrong:", prompt).group(1)
            new = self.tokenizer(previous, add_special_tokens=False)["input_ids"][:max_new_tokens]
            padding = [self.tokenizer.pad_token_id] * (max_new_tokens - len(new))
            rows.append(torch.cat([ids, torch.tensor(new + padding)]))
        return torch.stack(rows)


def llm_kwargs(**overrides):
    return {"levels": 2, "prompt_template": SHORT_TEMPLATE, "system_prompt": "", "max_new_tokens": 6, **overrides}


def test_llm_backend_on_a_tiny_model(tiny_model, tiny_tokenizer, forget_rows, retain_rows):
    batched, sequential = (
        generate_llm_negatives(
            forget_rows, tiny_model, tiny_tokenizer, retain_rows=retain_rows, **llm_kwargs(batch_size=size)
        )
        for size in (4, 1)
    )
    assert batched == sequential
    assert [(row["id"], row["level"]) for row in batched] == [(row["id"], k) for row in forget_rows for k in (1, 2)]
    for forget, pair in zip(forget_rows, zip(batched[::2], batched[1::2])):
        texts = [negative["completion"].strip().lower() for negative in pair]
        assert all(texts) and len(set(texts)) == 2 and forget["output"].lower() not in texts
        assert all(negative["backend"] == "llm" and negative["prompt_template"] == SHORT_TEMPLATE for negative in pair)
    # Seeded per-row sampling does not depend on the batch either, and the seed matters.
    sampled = [generate_llm_negatives(forget_rows, tiny_model, tiny_tokenizer, batch_size=size, do_sample=True, seed=3,
                                      **llm_kwargs(levels=1)) for size in (3, 1)]  # fmt: skip
    assert sampled[0] == sampled[1]


def test_llm_degenerate_outputs_fall_back_to_perturb(tiny_tokenizer, forget_rows, retain_rows):
    echo = EchoGenerator(tiny_tokenizer)
    negatives = generate_llm_negatives(
        forget_rows,
        echo,
        tiny_tokenizer,
        retain_rows=retain_rows,
        seed=4,
        max_retries=1,
        **llm_kwargs(levels=3, max_new_tokens=64),
    )
    assert all(row["fallback"] for row in negatives) and {row["generator"] for row in negatives} == {"echo"}
    expected = perturb_negatives(forget_rows, retain_rows, levels=3, seed=4)
    assert [row["completion"] for row in negatives] == [row["completion"] for row in expected]
    # Per level: one greedy pass, then one sampled retry.
    assert [sampled for _, sampled in echo.calls] == [False, True] * 3


def test_llm_template_errors(tiny_model, tiny_tokenizer, forget_rows):
    with pytest.raises(GNMInputError, match="placeholders"):
        generate_llm_negatives(forget_rows, tiny_model, tiny_tokenizer, **llm_kwargs(prompt_template="{answer}"))


# ---------------------------------------------------------------------------------------------------------------
# store and check
# ---------------------------------------------------------------------------------------------------------------


def test_write_and_read_negatives(tmp_path, forget_rows):
    negatives = perturb_negatives(forget_rows, levels=2)
    jsonl_path, parquet_path = write_negatives(negatives, tmp_path / "neg.jsonl")
    assert parquet_path == str(tmp_path / "neg.parquet")
    assert read_negatives(jsonl_path) == negatives == read_negatives(parquet_path)
    assert read_negatives(tmp_path / "neg") == negatives
    assert sorted(os.listdir(tmp_path)) == ["neg.jsonl", "neg.parquet"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda row: row.pop("completion"), r"row 1, field 'completion': missing"),
        (lambda row: row.update(source_hash=7), r"row 1, field 'source_hash': expected str"),
        (lambda row: row.update(level=0), r"row 1, field 'level': expected a level >= 1"),
        (lambda row: row.update(level="2"), r"row 1, field 'level': expected int"),
        (lambda row: row.update(backend="gpt"), r"row 1, field 'backend'"),
    ],
)
def test_read_negatives_names_file_row_and_field(tmp_path, forget_rows, change, message):
    negatives = perturb_negatives(forget_rows, levels=2)
    change(negatives[1])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in negatives))
    with pytest.raises(GNMInputError, match=re.escape(str(path)) + ", " + message):
        read_negatives(path)


def test_hand_made_negatives_need_only_id_level_and_completion(forget_rows):
    negatives = [{"id": row["id"], "level": level, "completion": f"wrong {level}"} for row in forget_rows for level in (1, 2)]
    assert check_negatives(negatives, forget_rows)[forget_rows[0]["id"]] == ["wrong 1", "wrong 2"]
    with pytest.raises(GNMInputError, match="field 'source_hash': missing"):
        write_negatives(negatives, "unused.jsonl")


def test_check_negatives(forget_rows, retain_rows):
    negatives = perturb_negatives(forget_rows, levels=3)
    table = check_negatives(negatives, forget_rows)
    assert list(table) == [row["id"] for row in forget_rows] and all(len(texts) == 3 for texts in table.values())
    assert table[forget_rows[0]["id"]][2] == negatives[2]["completion"]
    with pytest.raises(GNMInputError, match=r"1 forget ids lack some of the levels 1..3 \(first: 'forget000qa0 \("):
        check_negatives(negatives[1:], forget_rows)
    with pytest.raises(GNMInputError, match=r"1 ids in the negatives are not in the forget set \(first: 'retain004"):
        check_negatives(negatives + perturb_negatives(retain_rows[:1], levels=3), forget_rows)
    with pytest.raises(GNMInputError, match=r"4 forget ids have no negatives"):
        check_negatives(negatives, forget_rows + retain_rows)
    with pytest.raises(GNMInputError, match=r"appear more than once"):
        check_negatives(negatives + negatives[:1], forget_rows)
    changed = [dict(row, output=row["output"] + "!") if i == 1 else row for i, row in enumerate(forget_rows)]
    with pytest.raises(GNMInputError, match=r"generated for a different forget set: 1 ids .*'forget001qa0'"):
        check_negatives(negatives, changed)
    with pytest.raises(GNMInputError, match=r"level above 2"):
        check_negatives(negatives, forget_rows, levels=2)


# ---------------------------------------------------------------------------------------------------------------
# build_negatives: resume, provenance, cache
# ---------------------------------------------------------------------------------------------------------------


def test_resume_after_an_interruption_gives_the_same_file(tmp_path, monkeypatch, varied_rows, pool_rows):
    rows = varied_rows[:10]
    settings = dict(retain_rows=pool_rows, seed=2, chunk_size=3, progress=False)
    expected = build_negatives(rows, "perturb", 3, tmp_path / "full" / "neg.jsonl", **settings)
    original = build_module._generate_chunk
    calls = []

    def stop_after_two_chunks(chunk, *args):
        calls.append([row["id"] for row in chunk])
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original(chunk, *args)

    monkeypatch.setattr(build_module, "_generate_chunk", stop_after_two_chunks)
    output = tmp_path / "resumed" / "neg.jsonl"
    with pytest.raises(KeyboardInterrupt):
        build_negatives(rows, "perturb", 3, output, **settings)
    partial = partial_path(output)
    assert not output.exists() and len(read_jsonl(partial)) == 1 + 6 * 3
    with open(partial, "a", encoding="utf-8") as handle:  # a row cut short by the crash
        handle.write('{"id": "pii0s')
    calls.clear()
    counting = lambda chunk, *args: calls.append(len(chunk)) or original(chunk, *args)  # noqa: E731
    monkeypatch.setattr(build_module, "_generate_chunk", counting)
    assert build_negatives(rows, "perturb", 3, output, **settings) == expected
    assert calls == [3, 1]  # only the 4 rows not done
    assert output.read_bytes() == (tmp_path / "full" / "neg.jsonl").read_bytes()
    assert (tmp_path / "resumed" / "neg.parquet").exists() and not os.path.exists(partial)
    # A finished file is reused as it is...
    calls.clear()
    assert build_negatives(rows, "perturb", 3, output, **settings) == expected and calls == []
    # ...unless it was made differently.
    with pytest.raises(GNMInputError, match=r"exists and was made differently \(seed: 2 there, 9 now\)"):
        build_negatives(rows, "perturb", 3, output, **dict(settings, seed=9))
    assert build_negatives(rows, "perturb", 3, output, overwrite=True, **dict(settings, seed=9)) != expected


def test_resume_refuses_other_settings(tmp_path, monkeypatch, forget_rows):
    original = build_module._generate_chunk

    def fail_second(chunk, *args):
        if chunk[0]["id"] != forget_rows[0]["id"]:
            raise RuntimeError("stop")
        return original(chunk, *args)

    monkeypatch.setattr(build_module, "_generate_chunk", fail_second)
    output = tmp_path / "neg.jsonl"
    with pytest.raises(RuntimeError):
        build_negatives(forget_rows, "perturb", 2, output, chunk_size=1, progress=False)
    monkeypatch.setattr(build_module, "_generate_chunk", original)
    with pytest.raises(GNMInputError, match=r"partial.jsonl: an unfinished run with other settings \(levels: 2 there"):
        build_negatives(forget_rows, "perturb", 3, output, progress=False)
    assert len(build_negatives(forget_rows, "perturb", 3, output, overwrite=True, progress=False)) == 12


def test_build_with_the_llm_backend_needs_a_generator(tmp_path, forget_rows):
    with pytest.raises(GNMInputError, match="needs a generator"):
        build_negatives(forget_rows, "llm", 2, tmp_path / "x.jsonl")
    with pytest.raises(GNMInputError, match="backend must be one of"):
        build_negatives(forget_rows, "gpt", 2, tmp_path / "x.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def data_folder(tmp_path, forget_rows, retain_rows):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, rows in (("forget.jsonl", forget_rows + PII_ROWS), ("retain.jsonl", retain_rows)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_cli_perturb_and_llm(tmp_path, data_folder, tiny_model, tiny_tokenizer, capsys):
    output = tmp_path / "out" / "perturb.jsonl"
    argv = ["negatives", "--forget", str(data_folder), "--backend", "perturb", "--levels", "3", "--output", str(output)]
    assert gnm_main(argv + ["--no-progress"]) == 0
    negatives = read_negatives(output)
    forget = read_jsonl(data_folder / "forget.jsonl")
    assert len(check_negatives(negatives, forget)) == len(forget)
    assert negatives == perturb_negatives(forget, read_jsonl(data_folder / "retain.jsonl"), levels=3)
    assert "30 negatives (10 forget rows x 3 levels, 0 perturb fallbacks)" in capsys.readouterr().err

    model_dir = tmp_path / "generator"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    template = tmp_path / "template.txt"
    template.write_text(SHORT_TEMPLATE)
    llm_output = tmp_path / "out" / "llm.parquet"
    argv = ["negatives", "--forget", str(data_folder / "forget.jsonl"), "--backend", "llm",
            "--generator", str(model_dir), "--levels", "2", "--max-new-tokens", "4", "--batch-size", "4",
            "--prompt-template", str(template), "--output", str(llm_output), "--no-progress"]  # fmt: skip
    assert gnm_main(argv) == 0
    negatives = read_negatives(llm_output)
    assert len(negatives) == 20 and {row["generator"] for row in negatives} == {str(model_dir)}
    assert {row["prompt_template"] for row in negatives} == {SHORT_TEMPLATE}


def test_cli_errors(tmp_path, data_folder, capsys):
    base = ["negatives", "--forget", str(data_folder), "--output", str(tmp_path / "n.jsonl")]
    assert gnm_main(base + ["--backend", "llm", "--levels", "2"]) == 2
    assert "--backend llm needs --generator" in capsys.readouterr().err
    assert gnm_main(base + ["--backend", "perturb", "--levels", "0"]) == 2
    assert "levels must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gnm_main(["negatives", "--help"])
    assert "gnm negatives --forget data/lume --backend perturb" in capsys.readouterr().out
