"""The SemEval-2025 Task 4 evaluation: metric contracts, batched == one-by-one, files, CLI, evaluate module, callback."""

import itertools
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from rouge_score import rouge_scorer

from gnm_trainer.cli import main as gnm_main
from gnm_trainer.data import classify_kind
from gnm_trainer.errors import GNMInputError
from gnm_trainer.evaluation import (
    SEMEVAL_METRIC_PATH,
    SemEvalCallback,
    document_nll,
    document_nll_one_by_one,
    evaluate_model,
    final_score,
    generate_greedy,
    generate_one_by_one,
    harmonic_mean_12,
    knowledge_score,
    load_mia_documents,
    mia_auc,
    mia_score,
    regurgitation_score,
    resolve_mmlu_score,
    score_rows,
    semeval_results,
    shard_bounds,
    write_report,
)
from gnm_trainer.evaluation.generation import (
    encode_each,
    pad_batch,
    pad_token_id,
    preallocated_cache,
    prefilled_cache,
    prompt_cache,
    shared_prefix_length,
)
from gnm_trainer.data.packing import first_fit_rows
from gnm_trainer.evaluation.packed_nll import packed_document_nll
from gnm_trainer.packed_forward import packing_unsupported_reason
from gnm_trainer.gnm_config import PAPER_TEXT_TEMPLATE

MAX_NEW_TOKENS = 8


# ---------------------------------------------------------------------------------------------------------------
# Pure metric functions
# ---------------------------------------------------------------------------------------------------------------


def test_ids_are_classified_like_the_official_script():
    assert classify_kind('"2ebbbb06-ab81-4bdf-af75-0157c7178a82"sc1') == "sc"
    assert classify_kind('"2ebbbb06-ab81-4bdf-af75-0157c7178a82"qa0') == "qa"
    assert classify_kind("6e6a1e6e-5b8c-4c33-9a67-0123456789abqa4") == "qa"
    assert classify_kind("plain-id") == "other"


def test_regurgitation_is_rouge_l_recall_not_f():
    reference, generation = "the cat sat on the mat", "the cat sat on the mat and then slept all day long"
    scores = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, generation)["rougeL"]
    assert regurgitation_score(reference, generation) == pytest.approx(1.0) == scores.recall
    assert scores.fmeasure < 0.8
    assert regurgitation_score("dogs running", "the dog runs") == pytest.approx(1.0)  # stemming


def test_knowledge_is_exact_match_after_strip_and_lower():
    assert knowledge_score("Quillport", "  quillport\n") == 1.0
    assert knowledge_score("Quillport", "Quillport.") == 0.0
    assert knowledge_score("Quillport", "in Quillport") == 0.0


def _row(split, task, kind, score):
    return {"id": f"x{kind}1", "split": split, "task": task, "kind": kind, "score": score}


def test_score_rows_layout_and_forget_inversion():
    rows = [_row("forget", "Task2", "sc", 0.2), _row("forget", "Task2", "sc", 0.4), _row("forget", "Task2", "qa", 0.0),
            _row("retain", "Task2", "sc", 0.8), _row("retain", "Task2", "qa", 1.0), _row("retain", "Task1", "sc", 0.5)]
    scores = score_rows(rows)
    assert scores["forget-set"]["Task2"] == {"regurgitation-score": pytest.approx(0.3), "knowledge-score": 0.0}
    assert scores["retain-set"]["Task1"] == {"regurgitation-score": 0.5, "knowledge-score": None}
    assert scores["retain-set"]["overall-regurgitation-score"] == pytest.approx(0.65)
    # forget values inverted: 1 - 0.3, 1 - 0.0; retain as they are; Task1 has no K so adds no term
    terms = [0.7, 1.0, 0.5, 0.8, 1.0]
    assert harmonic_mean_12(scores) == pytest.approx(len(terms) / sum(1 / t for t in terms))


def test_a_zero_term_makes_the_task_aggregate_zero():
    perfect_forget = score_rows([_row("forget", "Task1", "sc", 1.0), _row("retain", "Task1", "sc", 0.9)])
    assert harmonic_mean_12(perfect_forget) == 0.0  # forget R = 1 means 1 - R = 0: nothing forgotten
    lost_retain = score_rows([_row("forget", "Task1", "qa", 0.0), _row("retain", "Task1", "qa", 0.0)])
    assert harmonic_mean_12(lost_retain) == 0.0


def test_mia_auc_and_score():
    assert mia_auc([0.1, 0.2], [1.0, 2.0]) == 1.0  # members have lower loss: still memorised
    assert mia_auc([1.0, 2.0], [0.1, 0.2]) == 0.0
    assert mia_auc([1.0, 1.0], [1.0, 1.0]) == 0.5  # ties count one half
    assert mia_score(0.5) == 1.0 and mia_score(1.0) == 0.0 and mia_score(0.0) == 0.0
    for delta in (0.1, 0.25, 0.4):
        assert mia_score(0.5 + delta) == pytest.approx(mia_score(0.5 - delta))


def test_mia_auc_equals_pairwise_mann_whitney_with_ties():
    generator = random.Random(0)
    for _ in range(20):
        members = [generator.randint(0, 5) / 2 for _ in range(generator.randint(1, 9))]
        nonmembers = [generator.randint(0, 5) / 2 for _ in range(generator.randint(1, 9))]
        wins = sum((-m > -n) + 0.5 * (m == n) for m, n in itertools.product(members, nonmembers))
        assert mia_auc(members, nonmembers) == pytest.approx(wins / (len(members) * len(nonmembers)))


def test_final_score_averages_the_available_terms_and_names_them():
    assert final_score(0.6, 0.4, 0.8) == (pytest.approx(0.6), ["harmonic-mean-task-aggregate", "mmlu_average",
                                                               "mia_final_score"])
    assert final_score(0.6, None, 0.8) == (pytest.approx(0.7), ["harmonic-mean-task-aggregate", "mia_final_score"])
    results = semeval_results([_row("forget", "Task2", "qa", 0.0), _row("retain", "Task2", "qa", 1.0)],
                              member_nll=[0.1], nonmember_nll=[0.2], mmlu=0.5)
    for key in ("harmonic-mean-task-aggregate", "mia_loss_acc", "mmlu_average", "mia_final_score", "aggregate-score",
                "forget-set", "retain-set"):
        assert key in results
    assert results["mia_loss_acc"] == 1.0 and results["mia_final_score"] == 0.0
    assert results["aggregate-score"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert results["mia_mean_nll"] == {"members": pytest.approx(0.1), "nonmembers": pytest.approx(0.2)}


def test_the_mean_nlls_of_the_attack_are_reported_beside_the_official_keys():
    rows = [_row("forget", "Task2", "qa", 0.0), _row("retain", "Task2", "qa", 1.0)]
    results = semeval_results(rows, member_nll=[1.0, 3.0], nonmember_nll=[5.0, 6.0, 7.0])
    assert results["mia_mean_nll"] == {"members": pytest.approx(2.0), "nonmembers": pytest.approx(6.0)}
    assert semeval_results(rows)["mia_mean_nll"] is None


def test_shards_are_contiguous_and_cover_everything():
    for total, processes in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        bounds = [shard_bounds(total, processes, index) for index in range(processes)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_mmlu_score_from_number_or_file(tmp_path):
    assert resolve_mmlu_score("0.45") == 0.45
    path = tmp_path / "mmlu.json"
    path.write_text(json.dumps({"average_acc": 0.5}))
    assert resolve_mmlu_score(str(path)) == 0.5
    with pytest.raises(GNMInputError, match="between 0 and 1"):
        resolve_mmlu_score(45)
    with pytest.raises(GNMInputError, match="neither a number nor"):
        resolve_mmlu_score(str(tmp_path / "missing.json"))


def test_mia_documents_errors_name_file_and_row(tmp_path):
    (tmp_path / "mia").mkdir()
    (tmp_path / "mia" / "member.jsonl").write_text('{"id": "a", "document": "Alma Breck loves teal."}\n')
    (tmp_path / "mia" / "nonmember.jsonl").write_text('{"id": "b", "document": "ok"}\n{"id": "c", "text": "x"}\n')
    with pytest.raises(GNMInputError, match=r"nonmember\.jsonl, row 1: missing field 'document'"):
        load_mia_documents(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Batched generation and NLL against the organisers' one-at-a-time loop
# ---------------------------------------------------------------------------------------------------------------


def _texts(rows):
    return [row["input"] for row in rows] + [row["output"] for row in rows]


def test_batched_generation_equals_one_by_one(tiny_model, tiny_tokenizer, forget_rows, retain_rows):
    prompts = _texts(forget_rows + retain_rows[:1])
    tiny_model.eval()
    batched = generate_greedy(tiny_model, tiny_tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=3)
    reference = generate_one_by_one(tiny_model, tiny_tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)
    assert batched == reference
    assert len(set(len(tiny_tokenizer(p)["input_ids"]) for p in prompts)) > 1  # padding really happened


def test_batched_nll_equals_model_loss_per_document(tiny_model, tiny_tokenizer, forget_rows, retain_rows):
    documents = [f"{row['input']} {row['output']}" for row in forget_rows + retain_rows]
    tiny_model.eval()
    batched = document_nll(tiny_model, tiny_tokenizer, documents, batch_size=3)
    with torch.no_grad():
        expected = []
        for document in documents:
            ids = tiny_tokenizer(document, return_tensors="pt").input_ids
            expected.append(tiny_model(ids, labels=ids).loss.item())
    assert batched == pytest.approx(expected, abs=1e-5)
    assert document_nll_one_by_one(tiny_model, tiny_tokenizer, documents) == pytest.approx(expected, abs=1e-6)


def _loss_of_each_alone(model, tokenizer, documents):
    with torch.no_grad():
        losses = []
        for document in documents:
            ids = tokenizer(document, return_tensors="pt").input_ids
            losses.append(model(ids, labels=ids).loss.item())
        return losses


def test_packed_nll_equals_each_document_alone_and_keeps_the_auc(tiny_model, tiny_tokenizer, forget_rows,
                                                                 retain_rows):
    documents = [f"{row['input']} {row['output']}" for row in forget_rows + retain_rows] + _texts(forget_rows)
    encoded = encode_each(tiny_tokenizer, documents)
    lengths = [len(ids) for ids in encoded]
    max_row_tokens = 3 * max(lengths)
    rows = first_fit_rows(lengths, max_row_tokens)
    assert max(len(row) for row in rows) >= 3  # rows really hold several documents
    assert len({sum(lengths[i] for i in row) for row in rows}) > 1  # rows of different widths
    tiny_model.eval()
    alone = _loss_of_each_alone(tiny_model, tiny_tokenizer, documents)
    half = len(documents) // 2
    for rows_per_forward in (1, 2):  # two rows at a time: the narrower one ends with filler tokens
        packed = packed_document_nll(tiny_model, encoded, max_row_tokens, rows_per_forward)
        assert packed == pytest.approx(alone, abs=1e-5)
        assert mia_auc(packed[:half], packed[half:]) == mia_auc(alone[:half], alone[half:])


def test_packed_rows_restart_positions_and_carry_no_mask(tiny_model, tiny_tokenizer):
    seen = []
    tiny_model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    tiny_model.eval()
    document_nll(tiny_model, tiny_tokenizer, ["one short text", "a second and somewhat longer text"], batch_size=2)
    (call,) = seen  # one packed row for both documents
    first = len(tiny_tokenizer("a second and somewhat longer text")["input_ids"])  # longest first
    assert call["position_ids"][0].tolist() == list(range(first)) + list(range(call["input_ids"].shape[1] - first))
    assert call.get("attention_mask") is None and call["use_cache"] is False


def test_models_that_cannot_separate_packed_documents_are_padded(tiny_model, tiny_tokenizer, forget_rows,
                                                                  monkeypatch):
    from peft import LoraConfig, get_peft_model

    import gnm_trainer.evaluation.generation as generation_module

    assert packing_unsupported_reason(tiny_model) is None
    assert packing_unsupported_reason(get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))) is None
    monkeypatch.setattr(type(tiny_model), "_supports_attention_backend", False)  # e.g. older remote code
    assert packing_unsupported_reason(tiny_model) is not None
    monkeypatch.undo()
    tiny_model.config._attn_implementation = "some_kernel"
    assert packing_unsupported_reason(tiny_model) is not None
    tiny_model.config._attn_implementation = "sdpa"
    documents = _texts(forget_rows)
    tiny_model.eval()
    packed = document_nll(tiny_model, tiny_tokenizer, documents, batch_size=3)
    monkeypatch.setattr(generation_module, "packing_unsupported_reason", lambda model: "forced")
    padded = document_nll(tiny_model, tiny_tokenizer, documents, batch_size=3)
    assert padded == pytest.approx(packed, abs=1e-5)
    assert padded == pytest.approx(_loss_of_each_alone(tiny_model, tiny_tokenizer, documents), abs=1e-5)


def test_preallocated_cache_holds_what_a_dynamic_cache_holds_without_copying_it(tiny_model):
    from transformers.cache_utils import DynamicCache

    preallocated, dynamic = preallocated_cache(tiny_model, max_new_tokens=4), DynamicCache(config=tiny_model.config)
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 2, width, 16, generator=generator) for width in (5, 1, 1, 1, 1, 1)]  # a prompt, then steps
    buffers = set()
    for step in states:
        keys, values = preallocated.layers[0].update(step, -step)
        expected_keys, expected_values = dynamic.layers[0].update(step, -step)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        buffers.add(keys.data_ptr())
    assert len(buffers) == 2  # the prompt's buffer had room for 4 more tokens; the fifth grew it once


def test_shared_prefix_leaves_every_prompt_its_last_token():
    assert shared_prefix_length([[1, 2, 3, 9], [1, 2, 4]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert shared_prefix_length([[5]]) == 0 and shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_prompts_prefilled_one_by_one_generate_what_a_padded_batch_generates(tiny_model, tiny_tokenizer,
                                                                             forget_rows):
    sequences = encode_each(tiny_tokenizer, _texts(forget_rows))
    tiny_model.eval()
    for opening in ([], encode_each(tiny_tokenizer, ["Rewrite this answer so that it is wrong:"])[0]):
        prompts = [opening + sequence for sequence in sequences]
        prompts.append(prompts[0][: len(opening) + 1])  # nothing after the shared opening but the last token
        assert len({len(prompt) for prompt in prompts}) > 2
        shared = shared_prefix_length(prompts)
        assert shared >= len(opening)
        pad_id = pad_token_id(tiny_tokenizer)
        input_ids, attention_mask = pad_batch(prompts, pad_id, side="left")
        options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                       pad_token_id=pad_id)
        padded = tiny_model.generate(**options)
        shared_prefix = (shared, prompt_cache(tiny_model, prompts[0][:shared])) if shared else None
        cache = prefilled_cache(tiny_model, prompts, max_new_tokens=6, shared_prefix=shared_prefix)
        assert torch.equal(tiny_model.generate(**options, cache=cache), padded)


def _official_scores(rows, generations):
    """The organisers' scoring of one-at-a-time generations, re-implemented independently."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = {}
    for row, generation in zip(rows, generations):
        if row["id"][:-1].endswith("sc"):
            scores[row["id"]] = scorer.score(str(row["output"]), str(generation))["rougeL"].recall
        elif row["id"][:-1].endswith("qa"):
            scores[row["id"]] = int(str(row["output"]).strip().lower() == str(generation).strip().lower())
    return scores


def _scorable_rows(forget_rows, retain_rows, generations):
    """Rows of both kinds where some references are the model's own outputs, so that scores are not all 0."""
    rows = [dict(r) for r in forget_rows + retain_rows]
    for index, row in enumerate(rows):
        row["id"] = row["id"][:-3] + ("sc1" if index % 2 else "qa0")
    for index in (0, 1, 4, 5):
        rows[index]["output"] = generations[index].strip() or "x"
    rows[3]["output"] = generations[3] + " and more words after it"  # partial recall
    return rows


def test_evaluate_model_matches_the_official_loop(tiny_model, tiny_tokenizer, forget_rows, retain_rows):
    tiny_model.eval()
    prompts = [row["input"] for row in forget_rows + retain_rows]
    one_by_one = generate_one_by_one(tiny_model, tiny_tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)
    rows = _scorable_rows(forget_rows, retain_rows, one_by_one)
    forget, retain = rows[:4], rows[4:]
    expected = _official_scores(rows, one_by_one)
    members, nonmembers = _texts(forget_rows[:2]), _texts(retain_rows[:3])
    tiny_model.train()
    results, per_example = evaluate_model(tiny_model, tiny_tokenizer, forget, retain, members, nonmembers,
                                          max_new_tokens=MAX_NEW_TOKENS, batch_size=3)
    assert tiny_model.training  # mode restored
    assert {row["id"]: row["score"] for row in per_example} == pytest.approx(expected)
    assert set(expected.values()) - {0, 0.0}  # some non-zero scores were compared
    assert [row["split"] for row in per_example] == ["forget"] * 4 + ["retain"] * 4
    assert set(per_example[0]) == {"id", "split", "task", "kind", "prompt", "reference", "generation", "score"}
    tiny_model.eval()
    member_nll = document_nll_one_by_one(tiny_model, tiny_tokenizer, members)
    nonmember_nll = document_nll_one_by_one(tiny_model, tiny_tokenizer, nonmembers)
    assert results["mia_loss_acc"] == pytest.approx(mia_auc(member_nll, nonmember_nll))


# ---------------------------------------------------------------------------------------------------------------
# Prompt format (text_template), precision (dtype) and progress bars
# ---------------------------------------------------------------------------------------------------------------


def _record_generate_inputs(model):
    """Wrap `model.generate` so that the token ids of each call's rows (padding removed) are recorded."""
    fed, generate = [], model.generate

    def recording_generate(*args, **kwargs):
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
            fed.append(ids[mask.bool()].tolist())
        return generate(*args, **kwargs)

    model.generate = recording_generate
    return fed


def _evaluate_feeding(model, tokenizer, forget_rows, retain_rows, **options):
    fed = _record_generate_inputs(model)
    members, nonmembers = _texts(forget_rows[:2]), _texts(retain_rows[:2])
    results, rows = evaluate_model(model, tokenizer, forget_rows, retain_rows, members, nonmembers,
                                   max_new_tokens=2, batch_size=3, **options)
    return fed, results, rows


def test_a_template_prompts_generation_with_its_prompt_side(tiny_model, tiny_tokenizer, forget_rows, retain_rows):
    rows = forget_rows + retain_rows
    fed, results, per_example = _evaluate_feeding(tiny_model, tiny_tokenizer, forget_rows, retain_rows,
                                                  text_template=PAPER_TEXT_TEMPLATE)
    expected = [tiny_tokenizer(f"{row['input']} >>")["input_ids"] for row in rows]
    assert sorted(fed) == sorted(expected)  # batches are length-sorted: compare as multisets
    assert [row["prompt"] for row in per_example] == [f"{row['input']} >>" for row in rows]
    assert results["settings"]["text_template"] == PAPER_TEXT_TEMPLATE
    assert results["settings"]["prompt_format"] == "{prompt} >>"
    assert any("not fed raw" in note for note in results["notes"])
    # MIA documents are scored raw whatever the template: the same AUC as the official format
    _, official, _ = _evaluate_feeding(tiny_model, tiny_tokenizer, forget_rows, retain_rows)
    assert results["mia_loss_acc"] == official["mia_loss_acc"]


def test_the_default_prompt_is_the_raw_input(tiny_model, tiny_tokenizer, forget_rows, retain_rows):
    fed, results, per_example = _evaluate_feeding(tiny_model, tiny_tokenizer, forget_rows, retain_rows)
    assert sorted(fed) == sorted(tiny_tokenizer(row["input"])["input_ids"] for row in forget_rows + retain_rows)
    assert results["settings"]["text_template"] is None and results["settings"]["prompt_format"] == "{prompt}"
    assert not any("not fed raw" in note for note in results["notes"])
    assert "answer" not in per_example[0]


def test_a_template_s_closing_text_is_removed_before_scoring(tiny_model, tiny_tokenizer, monkeypatch):
    import gnm_trainer.evaluation.evaluator as evaluator_module

    monkeypatch.setattr(evaluator_module, "generate_greedy", lambda model, tokenizer, prompts, **kwargs:
                        [" Quillport is the answer."] * len(prompts))
    forget = [{"id": "f1qa0", "input": "Where does Alma Breck live?", "output": "Quillport", "task": "Task2"}]
    retain = [{"id": "r1qa0", "input": "Where does Tom Vale live?", "output": "Quillport", "task": "Task2"}]
    _, templated = evaluate_model(tiny_model, tiny_tokenizer, forget, retain, text_template=PAPER_TEXT_TEMPLATE)
    _, raw = evaluate_model(tiny_model, tiny_tokenizer, forget, retain)
    assert [row["score"] for row in templated] == [1.0, 1.0]
    assert templated[0]["answer"] == " Quillport" and templated[0]["generation"] == " Quillport is the answer."
    assert [row["score"] for row in raw] == [0.0, 0.0]
    with pytest.raises(GNMInputError, match="text_template"):
        evaluate_model(tiny_model, tiny_tokenizer, forget, retain, text_template="{completion} after {prompt}")


def _record_dtypes(monkeypatch):
    """Record the parameter dtype of the model that generation and the MIA NLL see."""
    import gnm_trainer.evaluation.evaluator as evaluator_module

    seen = {}
    for name in ("generate_greedy", "document_nll"):
        function = getattr(evaluator_module, name)

        def recording(model, *args, _name=name, _function=function, **kwargs):
            seen[_name] = next(model.parameters()).dtype
            return _function(model, *args, **kwargs)

        monkeypatch.setattr(evaluator_module, name, recording)
    return seen


def test_evaluate_model_scores_a_copy_in_the_requested_dtype(tiny_model, tiny_tokenizer, forget_rows, retain_rows,
                                                             monkeypatch):
    seen = _record_dtypes(monkeypatch)
    _, results, _ = _evaluate_feeding(tiny_model, tiny_tokenizer, forget_rows, retain_rows, dtype="bfloat16")
    assert seen == {"generate_greedy": torch.bfloat16, "document_nll": torch.bfloat16}
    assert results["settings"]["dtype"] == "bfloat16"
    assert next(tiny_model.parameters()).dtype == torch.float32  # the model itself is untouched
    _, results, _ = _evaluate_feeding(tiny_model, tiny_tokenizer, forget_rows, retain_rows)  # default: as it is
    assert seen["generate_greedy"] == torch.float32 and results["settings"]["dtype"] == "float32"
    with pytest.raises(GNMInputError, match="dtype"):
        evaluate_model(tiny_model, tiny_tokenizer, forget_rows, retain_rows, dtype="int8")


def test_progress_bars_count_prompts_and_documents_and_can_be_turned_off(tiny_model, tiny_tokenizer, forget_rows,
                                                                        retain_rows, capsys):
    _evaluate_feeding(tiny_model, tiny_tokenizer, forget_rows, retain_rows)
    shown = capsys.readouterr().err
    assert "generation" in shown and "8/8" in shown  # 4 forget + 4 retain prompts
    assert "MIA NLL" in shown and "8/8" in shown.split("MIA NLL", 1)[1]  # 4 + 4 documents
    _evaluate_feeding(tiny_model, tiny_tokenizer, forget_rows, retain_rows, show_progress=False)
    hidden = capsys.readouterr().err
    assert "generation" not in hidden and "MIA NLL" not in hidden


# ---------------------------------------------------------------------------------------------------------------
# Files: report, CLI, evaluate module
# ---------------------------------------------------------------------------------------------------------------


def test_report_files_are_written(tmp_path):
    before = semeval_results([_row("forget", "Task2", "sc", 0.9), _row("retain", "Task2", "qa", 1.0)], [0.1], [0.5])
    after = semeval_results([_row("forget", "Task2", "sc", 0.2), _row("retain", "Task2", "qa", 1.0)], [0.4], [0.5])
    report_path, plot_path = write_report(str(tmp_path), before, after, title="tiny")
    text = open(report_path, encoding="utf-8").read()
    assert "| forget | Task2 | 0.900 | 0.200 | – | – |" in text
    assert "task aggregate (HM12)" in text and "MIA AUC" in text
    assert open(plot_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["plot.png", "report.md"]  # no temporary files left


@pytest.fixture
def saved_model_and_data(tmp_path, tiny_model, tiny_tokenizer, forget_rows, retain_rows):
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    (data_dir / "mia").mkdir(parents=True)
    for name, rows in (("forget_train.jsonl", forget_rows), ("retain_train.jsonl", retain_rows)):
        rows = [dict(row, id=row["id"][:-3] + ("sc1" if i % 2 else "qa0")) for i, row in enumerate(rows)]
        (data_dir / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name, rows in (("member.jsonl", forget_rows), ("nonmember.jsonl", retain_rows)):
        docs = [{"id": str(i), "document": f"{r['input']} {r['output']}"} for i, r in enumerate(rows)]
        (data_dir / "mia" / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(model_dir), str(data_dir)


def test_cli_evaluate_end_to_end(tmp_path, saved_model_and_data, capsys):
    model_dir, data_dir = saved_model_and_data
    output_dir = str(tmp_path / "eval")
    code = gnm_main(["evaluate", "--model", model_dir, "--data", data_dir, "--mia-data", os.path.join(data_dir, "mia"),
                     "--mmlu-score", "0.45", "--max-new-tokens", "8", "--batch-size", "4", "--output-dir", output_dir])
    assert code == 0
    assert sorted(os.listdir(output_dir)) == ["evaluation_results.json", "per_example.jsonl", "plot.png", "report.md"]
    results = json.load(open(os.path.join(output_dir, "evaluation_results.json")))
    assert set(results["forget-set"]["Task2"]) == {"regurgitation-score", "knowledge-score"}
    assert results["mmlu_average"] == 0.45 and results["mia_loss_acc"] is not None
    assert results["aggregate-score-terms"] == ["harmonic-mean-task-aggregate", "mmlu_average", "mia_final_score"]
    assert results["settings"]["dtype"] == "float32"
    assert len(open(os.path.join(output_dir, "per_example.jsonl")).readlines()) == 8
    assert "aggregate-score=" in capsys.readouterr().out
    # a user error: exit status 2 and a message naming the problem, before any model is loaded
    assert gnm_main(["evaluate", "--model", model_dir, "--data", data_dir, "--mmlu-score", "nope.json"]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_cli_evaluates_in_the_requested_dtype_and_records_it(tmp_path, saved_model_and_data, capsys, monkeypatch):
    model_dir, data_dir = saved_model_and_data
    seen = _record_dtypes(monkeypatch)
    output_dir = str(tmp_path / "eval")
    code = gnm_main(["evaluate", "--model", model_dir, "--data", data_dir, "--mia-data", os.path.join(data_dir, "mia"),
                     "--max-new-tokens", "4", "--dtype", "bfloat16", "--batch-size", "1", "--no-progress",
                     "--text-template", PAPER_TEXT_TEMPLATE, "--output-dir", output_dir])
    assert code == 0
    assert seen == {"generate_greedy": torch.bfloat16, "document_nll": torch.bfloat16}
    results = json.load(open(os.path.join(output_dir, "evaluation_results.json")))
    assert results["settings"]["dtype"] == "bfloat16" and results["settings"]["batch_size"] == 1
    assert results["settings"]["text_template"] == PAPER_TEXT_TEMPLATE
    report = open(os.path.join(output_dir, "report.md")).read()
    assert "evaluated in bfloat16, batch size 1, prompts as `{prompt} >>`" in report
    assert "generation" not in capsys.readouterr().err  # --no-progress
    assert gnm_main(["evaluate", "--model", model_dir, "--data", data_dir, "--dtype", "double"]) == 2
    assert "dtype: expected one of float32, bfloat16, float16, auto" in capsys.readouterr().err


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gnm_main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_evaluate_module_loads_offline_from_its_folder(tmp_path):
    script = (
        "import evaluate, json\n"
        f"metric = evaluate.load({SEMEVAL_METRIC_PATH!r})\n"
        "out = metric.compute(predictions=['Paris ', 'the cat sat'], references=['paris', 'the cat sat on the mat'],\n"
        "                     ids=['a1qa0', '\"b\"sc1'], splits=['retain', 'forget'], tasks=['Task2', 'Task1'])\n"
        "print(json.dumps(out))\n"
    )
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
                       OMP_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                               timeout=120, check=True)
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    assert out["retain-set"]["Task2"]["knowledge-score"] == 1.0
    assert out["forget-set"]["Task1"]["regurgitation-score"] == pytest.approx(0.5)
    assert out["harmonic-mean-task-aggregate"] == pytest.approx(2 / (1 / 1.0 + 1 / 0.5))


# ---------------------------------------------------------------------------------------------------------------
# In-training callback
# ---------------------------------------------------------------------------------------------------------------


def _args_and_state(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    return args, TrainerState(), TrainerControl()


def test_callback_keeps_the_best_step(tmp_path, tiny_model, tiny_tokenizer, forget_rows, retain_rows, monkeypatch):
    import gnm_trainer.evaluation.callback as callback_module

    objectives = iter([0.3, 0.5, 0.4])
    monkeypatch.setattr(callback_module, "evaluate_model", lambda *a, **k: (
        semeval_results([_row("retain", "Task2", "qa", 1.0)], mmlu=None) | {"aggregate-score": next(objectives)}, []))
    callback = SemEvalCallback(forget_rows, retain_rows, eval_steps=2)
    args, state, control = _args_and_state(tmp_path)
    marker = tiny_model.lm_head.weight
    for step in range(1, 6):
        state.global_step = step
        with torch.no_grad():
            marker[0, 0] = step  # the weights "trained" up to this step, recognisable in a saved copy
        callback.on_step_end(args, state, control, model=tiny_model, processing_class=tiny_tokenizer)
    callback.on_train_end(args, state, control, model=tiny_model, processing_class=tiny_tokenizer)
    # Each evaluation logs the numeric leaves of the results, nested keys joined by "/" (None, lists and notes
    # left out): one retain qa row scored 1.0 gives K = 1 for Task2 and overall, and a harmonic mean of 1.
    assert state.log_history == [
        {"step": step, "semeval/retain-set/overall-knowledge-score": 1.0,
         "semeval/retain-set/Task2/knowledge-score": 1.0, "semeval/harmonic-mean-task-aggregate": 1.0,
         "semeval/aggregate-score": objective}
        for step, objective in ((2, 0.3), (4, 0.5), (5, 0.4))
    ]  # fmt: skip
    best = json.load(open(os.path.join(args.output_dir, "best", "best.json")))
    assert (best["step"], best["value"]) == (4, 0.5) and callback.best_step == 4
    assert best["results"]["retain-set"]["Task2"]["knowledge-score"] == 1.0
    # The saved model is the one of step 4 (not the last, step 5, which scored lower).
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(os.path.join(args.output_dir, "best"))
    assert saved.lm_head.weight[0, 0].item() == 4.0 and marker[0, 0].item() == 5.0

    # Minimising the same objective keeps the lowest value, step 2; a later tie does not replace it.
    objectives = iter([0.3, 0.5, 0.3])
    lowest = SemEvalCallback(forget_rows, retain_rows, eval_steps=2, greater_is_better=False, save_best=False)
    args, state, control = _args_and_state(tmp_path / "lowest")
    for step in range(1, 6):
        state.global_step = step
        lowest.on_step_end(args, state, control, model=tiny_model, processing_class=tiny_tokenizer)
    lowest.on_train_end(args, state, control, model=tiny_model, processing_class=tiny_tokenizer)
    assert (lowest.best_step, lowest.best_value) == (2, 0.3)
    assert not os.path.exists(os.path.join(args.output_dir, "best"))  # save_best=False writes nothing


def test_callback_forwards_dtype_template_and_progress(tmp_path, tiny_model, tiny_tokenizer, forget_rows,
                                                      retain_rows, monkeypatch):
    import gnm_trainer.evaluation.callback as callback_module

    received = []
    monkeypatch.setattr(callback_module, "evaluate_model", lambda *a, **k: (
        received.append(k) or semeval_results([_row("retain", "Task2", "qa", 1.0)]), []))
    args, state, control = _args_and_state(tmp_path)
    SemEvalCallback(forget_rows, retain_rows, save_best=False).evaluate(args, state, tiny_model, tiny_tokenizer)
    SemEvalCallback(forget_rows, retain_rows, save_best=False, dtype="bfloat16", text_template=PAPER_TEXT_TEMPLATE,
                    show_progress=True).evaluate(args, state, tiny_model, tiny_tokenizer)
    options = [{key: k[key] for key in ("dtype", "text_template", "show_progress")} for k in received]
    assert options == [{"dtype": "auto", "text_template": None, "show_progress": False},
                       {"dtype": "bfloat16", "text_template": PAPER_TEXT_TEMPLATE, "show_progress": True}]


def test_callback_in_a_trainer_with_a_peft_model(tmp_path, tiny_model, tiny_tokenizer, forget_rows, retain_rows):
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = [tiny_tokenizer("Alma Breck loves teal.")["input_ids"]] * 4
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    callback = SemEvalCallback(forget_rows[:2], retain_rows[:2], mia_members=_texts(forget_rows[:1]),
                               mia_nonmembers=_texts(retain_rows[:1]), eval_steps=1, max_new_tokens=4)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                      processing_class=tiny_tokenizer, callbacks=[callback])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "semeval/aggregate-score" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert "semeval/mia_final_score" in logged[0]
    best_dir = os.path.join(args.output_dir, "best")
    assert os.path.isfile(os.path.join(best_dir, "adapter_config.json"))  # the adapter, not the merged model
    assert os.path.isfile(os.path.join(best_dir, "tokenizer.json"))
    assert json.load(open(os.path.join(best_dir, "best.json")))["step"] == callback.best_step
