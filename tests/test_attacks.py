"""Attacks on an unlearned model (quantisation, relearning): the recovery formula, the document split, real bitsandbytes
quantisation, a relearning attack that writes nothing and repeats itself, and `gnm evaluate --attacks`."""

import hashlib
import json
import os
import sys

import pytest
from conftest import FACTS
from test_bad_input import one_line_error

from gnm_trainer.cli import main as gnm_main
from gnm_trainer.errors import GNMInputError
from gnm_trainer.evaluation.attacks import (
    KNOWLEDGE,
    MEAN,
    REGURGITATION,
    forget_scores,
    load_quantised,
    recovery,
    run_attacks,
    split_documents,
)
from gnm_trainer.target import build_tiny_llama

R, K = REGURGITATION, KNOWLEDGE


def lume_rows(split, start, stop):
    """Two rows per document (a sentence completion `sc1` and a question `qa0`), so documents hold several rows."""
    rows = []
    for i, (question, answer) in enumerate(FACTS[start:stop], start):
        rows.append({"id": f"{split}{i:03d}sc1", "input": question, "output": answer, "task": "Task2", "split": split})
        rows.append({"id": f"{split}{i:03d}qa0", "input": question, "output": answer, "task": "Task2", "split": split})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def folder_hashes(folder):
    """sha256 of every file under `folder`, by relative path."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            hashes[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer):
    """A target (a tiny Llama, hidden size 64: bitsandbytes' 4-bit blocks need it), an "unlearned" LoRA adapter
    over it (non-zero, so it differs from the target), and a LUME data folder with 4 forget documents."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("attacks")
    target = build_tiny_llama(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=256)
    target.save_pretrained(root / "target")
    tiny_tokenizer.save_pretrained(root / "target")
    target = AutoModelForCausalLM.from_pretrained(root / "target")  # the adapter then names its base folder
    adapter = get_peft_model(target, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter.save_pretrained(root / "unlearned")
    tiny_tokenizer.save_pretrained(root / "unlearned")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "forget_train.jsonl", lume_rows("forget", 0, 4))
    write_jsonl(root / "data" / "retain_train.jsonl", lume_rows("retain", 4, 5))
    return root


def scored(split, task, kind, score, index=0):
    return {"id": f"{split}{index:03d}{kind}{'1' if kind == 'sc' else '0'}", "split": split, "task": task,
            "kind": kind, "score": score}


# ---------------------------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------------------------


def test_recovery_is_the_fraction_of_what_unlearning_removed_that_came_back():
    def rows(task1_r, task1_k, task2_r):
        return [scored("forget", "Task1", "sc", task1_r), scored("forget", "Task1", "qa", task1_k, 1),
                scored("forget", "Task2", "sc", task2_r, 2), scored("retain", "Task1", "sc", 0.9, 3)]

    target, unlearned, attacked = (forget_scores(rows(*values))
                                   for values in ((0.8, 1.0, 0.4), (0.2, 0.0, 0.4), (0.35, 0.75, 0.6)))
    assert attacked["Task1"] == {R: 0.35, K: 0.75, MEAN: pytest.approx(0.55)}
    figures, notes = recovery(target, unlearned, attacked)
    assert figures["Task1"][R] == pytest.approx((0.35 - 0.2) / (0.8 - 0.2))  # 0.25
    assert figures["Task1"][K] == pytest.approx(0.75)
    assert figures["Task1"][MEAN] == pytest.approx((0.55 - 0.1) / (0.9 - 0.1))
    # overall: over all forget rows, as the official overall keys (R: mean of 0.35 and 0.6 against 0.6 and 0.3)
    assert figures["overall"][R] == pytest.approx((0.475 - 0.3) / (0.6 - 0.3))
    # Task2 R: target and unlearned equal, nothing was removed: no figure, and a note instead of a division by zero
    assert figures["Task2"][R] is None and figures["Task2"][K] is None
    assert any(note.startswith("Task2 regurgitation-score") and "nothing was removed" in note for note in notes)


def test_documents_are_split_in_two_disjoint_seeded_halves():
    rows = [{"id": row["id"]} for row in lume_rows("forget", 0, 7)]  # 7 documents, 2 rows each

    def documents(part):
        return {row["id"][:-3] for row in part}

    train, held_out = split_documents(rows, seed=0)
    assert len(documents(train)) == 3 and len(documents(held_out)) == 4
    assert not documents(train) & documents(held_out)  # a document's rows stay together
    assert sorted(r["id"] for r in train + held_out) == sorted(r["id"] for r in rows)
    assert split_documents(rows, seed=0) == (train, held_out)  # deterministic
    assert len({tuple(sorted(documents(split_documents(rows, seed)[0]))) for seed in range(6)}) > 1  # seeded
    with pytest.raises(GNMInputError, match="1 document"):
        split_documents(rows[:2], seed=0)


# ---------------------------------------------------------------------------------------------------------------
# The attacks on tiny models
# ---------------------------------------------------------------------------------------------------------------


def test_quantisation_replaces_the_linear_layers_and_scores_the_quantised_model(workspace):
    import bitsandbytes as bnb

    for bits, layer in ((8, bnb.nn.Linear8bitLt), (4, bnb.nn.Linear4bit)):
        model = load_quantised(str(workspace / "target"), bits)
        assert sum(isinstance(module, layer) for module in model.modules()) == 14  # 2 layers x (4 attention + 3 MLP)
    data = workspace / "data"
    figures = run_attacks(str(workspace / "unlearned"), None, str(data / "forget_train.jsonl"),
                          str(data / "retain_train.jsonl"), attacks="quant8,quant4", target=str(workspace / "target"),
                          max_new_tokens=4, batch_size=8)
    for name in ("quant8", "quant4"):
        assert set(figures[name]["forget-set"]) == {"Task2", "overall"}
        assert 0.0 <= figures[name]["forget-set"]["overall"][R] <= 1.0
        assert figures[name]["retain-set"]["Task2"][K] is not None
        assert set(figures[name]["recovery"]["overall"]) == {R, K, MEAN}
    assert "relearn" not in figures


def test_relearning_writes_nothing_to_disk_and_repeats_its_figures(workspace):
    data = workspace / "data"
    before = {name: folder_hashes(workspace / name) for name in ("unlearned", "target", "data")}
    runs = [run_attacks(str(workspace / "unlearned"), None, str(data / "forget_train.jsonl"),
                        str(data / "retain_train.jsonl"), attacks=["relearn"], target=str(workspace / "target"),
                        seed=3, relearn_steps=3, relearn_learning_rate=1e-2, max_new_tokens=4, batch_size=8)
             for _ in range(2)]
    assert {name: folder_hashes(workspace / name) for name in before} == before
    assert runs[0] == runs[1]
    relearn = runs[0]["relearn"]
    assert relearn["train_rows"] == 4 and relearn["held_out_rows"] == 4
    held_out_documents = {row_id[:-3] for row_id in relearn["held_out_ids"]}
    assert len(held_out_documents) == 2  # whole documents: both rows of each held-out document
    assert set(relearn) >= {"forget-set", "target-forget-set", "unlearned-forget-set", "recovery", "notes"}


def test_a_model_in_memory_is_left_as_it_was(workspace, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workspace / "target")
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    data = workspace / "data"
    run_attacks(model, tiny_tokenizer, str(data / "forget_train.jsonl"), str(data / "retain_train.jsonl"),
                attacks="relearn", relearn_steps=2, max_new_tokens=2, batch_size=8)
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# gnm evaluate --attacks
# ---------------------------------------------------------------------------------------------------------------


def test_cli_writes_the_attacks_key_the_report_section_and_the_card(workspace, tmp_path, capsys):
    from gnm_trainer.model_card import build_model_card, summary_from_directory

    output_dir = tmp_path / "eval"
    code = gnm_main(["evaluate", "--model", str(workspace / "unlearned"), "--data", str(workspace / "data"),
                     "--attacks", "quant8,relearn", "--target_model", str(workspace / "target"),
                     "--relearn_steps", "2", "--attack_seed", "1", "--max_new_tokens", "4", "--batch_size", "8",
                     "--no_progress", "--output_dir", str(output_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "attacks: quant8_recovery=" in out and "relearn_recovery=" in out
    assert sorted(os.listdir(output_dir)) == ["attacks.png", "evaluation_results.json", "per_example.jsonl",
                                              "plot.png", "report.md"]
    results = json.loads((output_dir / "evaluation_results.json").read_text())
    official = {"forget-set", "retain-set", "aggregated-terms", "harmonic-mean-task-aggregate", "mia_loss_acc",
                "mia_final_score", "mia_mean_nll", "mmlu_average", "aggregate-score", "aggregate-score-terms", "notes",
                "settings"}
    assert set(results) == official | {"attacks"}
    assert results["attacks"]["settings"]["attacks"] == ["quant8", "relearn"]
    assert results["attacks"]["settings"]["seed"] == 1 and results["attacks"]["settings"]["relearn_steps"] == 2
    assert set(results["attacks"]) >= {"quant8", "relearn", "target-forget-set", "unlearned-forget-set"}
    report = (output_dir / "report.md").read_text()
    assert "## Attacks" in report and "| quant8 | all |" in report and "| relearn | held-out half (4) |" in report
    card = str(build_model_card(summary_from_directory(str(workspace / "unlearned")), results))
    assert "Attacks: does the forgotten come back?" in card and "| relearn | held-out half (4) |" in card


def test_attack_flags_without_attacks_are_an_error(workspace, capsys):
    lines = one_line_error(capsys, ["evaluate", "--model", str(workspace / "target"), "--data",
                                          str(workspace / "data"), "--relearn_steps", "3"], 2)
    assert "add --attacks" in lines


@pytest.mark.parametrize("case", ["unknown", "no_bitsandbytes", "no_linear", "one_document", "zero_steps",
                                  "results_without_rows"])
def test_bad_attack_inputs_are_one_line_each(workspace, tmp_path, tiny_tokenizer, capsys, monkeypatch, case):
    model, data, flags = str(workspace / "target"), workspace / "data", ["--attacks", "relearn"]
    if case == "unknown":
        flags = ["--attacks", "quant8,quant3"]
        expected = "unknown attack 'quant3'; expected a comma-separated list of quant8, quant4, relearn"
    elif case == "no_bitsandbytes":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
        flags, expected = ["--attacks", "quant4"], "pip install 'gnm_trainer[attacks]'"
    elif case == "no_linear":
        flat = build_tiny_llama(tiny_tokenizer, hidden_size=64, num_layers=0, num_heads=2, max_position_embeddings=64)
        flat.save_pretrained(tmp_path / "flat")
        tiny_tokenizer.save_pretrained(tmp_path / "flat")
        model, flags = str(tmp_path / "flat"), ["--attacks", "quant8"]
        expected = "cannot be quantised to 8-bit: it has no linear layer bitsandbytes can replace"
    elif case == "one_document":
        data = tmp_path / "data"
        data.mkdir()
        write_jsonl(data / "forget_train.jsonl", lume_rows("forget", 0, 1))
        write_jsonl(data / "retain_train.jsonl", lume_rows("retain", 4, 5))
        expected = "relearn: the forget set holds 1 document(s) (forget000)"
    elif case == "zero_steps":
        flags, expected = flags + ["--relearn_steps", "0"], "relearn_steps: expected an integer >= 1"
    else:
        (tmp_path / "target-eval").mkdir()
        (tmp_path / "target-eval" / "evaluation_results.json").write_text(json.dumps({"forget-set": {}}))
        flags = flags + ["--target_results", str(tmp_path / "target-eval" / "evaluation_results.json")]
        expected = "no per_example.jsonl beside it"
    line = one_line_error(capsys, ["evaluate", "--model", model, "--data", str(data), "--max_new_tokens", "2",
                                         "--output_dir", str(tmp_path / "eval"), *flags], 2)
    assert expected in line


# ---------------------------------------------------------------------------------------------------------------
# The in-training callback and the demo
# ---------------------------------------------------------------------------------------------------------------


def test_callback_attacks_the_final_model_only_when_asked(workspace, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments

    from gnm_trainer.evaluation import SemEvalCallback

    model = AutoModelForCausalLM.from_pretrained(workspace / "target")
    forget, retain = lume_rows("forget", 0, 4), lume_rows("retain", 4, 5)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    for attacks in (None, "relearn"):
        state = TrainerState()
        callback = SemEvalCallback(forget, retain, max_new_tokens=2, batch_size=8, save_best=False, attacks=attacks,
                                   attack_options={"relearn_steps": 2, "seed": 1})
        callback.on_train_end(args, state, TrainerControl(), model=model, processing_class=tiny_tokenizer)
        logged = [key for entry in state.log_history for key in entry if key.startswith("semeval/attacks/")]
        if attacks is None:
            assert callback.attack_results is None and not logged
            assert not os.path.exists(tmp_path / "run" / "attacks.json")  # off by default
        else:
            assert callback.attack_results["settings"]["seed"] == 1
            assert "semeval/attacks/relearn/forget-set/overall/regurgitation-score" in logged
            assert json.loads((tmp_path / "run" / "attacks.json").read_text()) == callback.attack_results
    with pytest.raises(GNMInputError, match="unknown attack 'quant2'"):
        SemEvalCallback(forget, retain, attacks="quant2")
