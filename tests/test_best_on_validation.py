"""`gnm unlearn --eval_on_validation_steps N`: the step that scores best on validation rows is the model saved."""

import hashlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import FACTS, write_jsonl
from safetensors.torch import load_file

from gnm_trainer.cli import main
from gnm_trainer.cli.best_on_validation import result_keys
from gnm_trainer.data.loading import load_unlearning_data
from gnm_trainer.manifest import MANIFEST_FILE

VALIDATION_LOGGER = "gnm_trainer.cli.best_on_validation"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lume_rows(split: str, kind: str, start: int, stop: int):
    """LUME rows from FACTS[start:stop]; `kind` is "qa0" (question answering) or "sc1" (sentence completion)."""
    return [{"id": f"{split}{i:03d}{kind}", "input": q, "output": a, "task": "Task2", "split": split}
            for i, (q, a) in enumerate(FACTS[start:stop], start=start)]


def memorise(model, tokenizer, steps: int = 150):
    """Train `model` in place until it reproduces every fact of FACTS after its question (a few seconds)."""
    batch = tokenizer([f"{q} {a}" for q, a in FACTS], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(scope="module")
def memorised_target(tmp_path_factory, tiny_tokenizer):
    """A tiny target that memorised all eight facts (training and validation ones), saved once for the module."""
    from gnm_trainer.target import build_tiny_llama

    path = tmp_path_factory.mktemp("target")
    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=256)
    memorise(model, tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def workspace(tmp_path, memorised_target):
    """LUME train and validation partitions (validation rows are sentence completions), non-member documents
    (`mia/nonmember.jsonl`) and a recipe that evaluates on validation every 2 of 6 steps."""
    data = tmp_path / "data"
    write_jsonl(data / "forget_train.jsonl", lume_rows("forget", "qa0", 0, 2))
    write_jsonl(data / "retain_train.jsonl", lume_rows("retain", "qa0", 4, 6))
    write_jsonl(data / "forget_validation.jsonl", lume_rows("forget", "sc1", 2, 4))
    write_jsonl(data / "retain_validation.jsonl", lume_rows("retain", "sc1", 6, 8))
    write_jsonl(tmp_path / "mia" / "nonmember.jsonl", [{"document": "Hal Ivers keeps bees near Tork."},
                                               {"document": "The Quill Gala is held in Marrow Cove."}])
    recipe = {
        "model_name_or_path": str(memorised_target),
        "data_dir": str(data),
        "loss_terms": ["ga"],
        "use_peft": True,
        "lora_r": 4,
        "lora_target_modules": ["all-linear"],
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "output_dir": str(tmp_path / "run"),
        "eval_on_validation_steps": 2,
        "validation_max_new_tokens": 12,
        "validation_batch_size": 4,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def unlearn(workspace, *flags) -> int:
    return main(["unlearn", "--config", str(workspace / "recipe.yaml"), *flags])


def evaluations(run, objective: str) -> dict[int, float]:
    """Step -> objective of every validation evaluation in the run's log history."""
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[f"semeval/{objective}"] for entry in history if f"semeval/{objective}" in entry}


def assert_same_tensors(saved: dict, best: dict) -> None:
    assert saved.keys() == best.keys() and saved
    for name, tensor in saved.items():
        assert torch.equal(tensor, best[name]), name


def test_the_saved_adapter_is_the_best_evaluation_and_the_manifest_names_its_step(workspace):
    nonmembers = str(workspace)  # a folder holding mia/nonmember.jsonl, as LUME's
    assert unlearn(workspace, "--validation_mia_nonmembers", nonmembers, "--learning_rate", "1e-1") == 0
    run = workspace / "run"
    scores = evaluations(run, "aggregate-score")
    assert sorted(scores) == [2, 4, 6]
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    data = workspace / "data"
    forget, retain = (load_unlearning_data(data, split, "validation") for split in ("forget", "retain"))
    for entry in (entry for entry in history if "semeval/aggregate-score" in entry):  # the keys checked up front
        logged = [key.removeprefix("semeval/") for key in entry if key.startswith("semeval/")]
        assert sorted(key for key in logged if not key.startswith("settings/")) == result_keys(forget, retain, True)
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["step"] == max(scores, key=lambda step: (scores[step], -step))  # the first of equal highest scores
    assert best["step"] < 6  # so that the final adapter equals best/'s only because best/ was loaded back
    saved, kept_best = run / "adapter_model.safetensors", run / "best" / "adapter_model.safetensors"
    assert_same_tensors(load_file(saved), load_file(kept_best))
    kept = json.loads((run / MANIFEST_FILE).read_text())["best_on_validation"]
    assert kept == {"step": best["step"], "objective": "aggregate-score", "value": best["value"], "last_step": 6}


def test_gradient_ascent_at_a_high_rate_keeps_an_earlier_full_model(workspace, caplog):
    objective = "retain-set/overall-regurgitation-score"
    with caplog.at_level(logging.WARNING, logger=VALIDATION_LOGGER):
        code = unlearn(workspace, "--use_peft", "false", "--learning_rate", "3e-3", "--validation_objective", objective)
    assert code == 0
    run = workspace / "run"
    scores = evaluations(run, objective)
    best = json.loads((run / "best" / "best.json").read_text())
    assert scores[6] < scores[best["step"]] == max(scores.values())  # later steps got worse: an earlier one is kept
    assert best["step"] < 6
    assert_same_tensors(load_file(run / "model.safetensors"), load_file(run / "best" / "model.safetensors"))
    assert json.loads((run / MANIFEST_FILE).read_text())["best_on_validation"]["step"] == best["step"]
    messages = [record.getMessage() for record in caplog.records if record.name == VALIDATION_LOGGER]
    assert sum("no MIA part" in message for message in messages) == 1
    assert any(f"Keeping step {best['step']} of 6" in message for message in messages)


def error_line(capsys, workspace, *flags) -> str:
    """Run `gnm unlearn` with `flags`; assert exit 2 and exactly one error line, without a traceback."""
    code = unlearn(workspace, *flags)
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error, error
    lines = [line for line in error.splitlines() if "gnm unlearn: error:" in line]
    assert len(lines) == 1, error
    return lines[0]


def test_eval_steps_below_one_is_an_error(workspace, capsys):
    assert "eval_on_validation_steps: expected a number of optimizer steps of at least 1, got 0" in error_line(
        capsys, workspace, "--eval_on_validation_steps", "0")


def test_a_source_without_a_validation_partition_is_an_error(workspace, capsys):
    harness = workspace / "harness"  # harness names carry no partition: "validation" would read the training rows
    write_jsonl(harness / "forget.jsonl", lume_rows("forget", "qa0", 0, 2))
    write_jsonl(harness / "retain.jsonl", lume_rows("retain", "qa0", 4, 6))
    assert "has no separate validation partition" in error_line(capsys, workspace, "--data_dir", str(harness))
    (workspace / "data" / "forget_validation.jsonl").unlink()
    line = error_line(capsys, workspace)
    assert "validation_partition 'validation'" in line and "no forget file found" in line


def test_missing_or_malformed_nonmember_documents_are_errors(workspace, capsys):
    line = error_line(capsys, workspace, "--validation_mia_nonmembers", str(workspace / "absent.jsonl"))
    assert "absent.jsonl: file or folder not found" in line
    write_jsonl(workspace / "bad.jsonl", [{"text": "Hal Ivers keeps bees near Tork."}])
    line = error_line(capsys, workspace, "--validation-mia-nonmembers", str(workspace / "bad.jsonl"))
    assert "bad.jsonl, row 0" in line and "missing field 'document'" in line


def test_resuming_keeps_the_best_evaluation_of_the_run_so_far(tmp_path):
    from gnm_trainer.cli.best_on_validation import resume_best
    from gnm_trainer.evaluation.callback import SemEvalCallback

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_text(json.dumps({"step": 4, "objective": "aggregate-score", "value": 0.5}))
    rows = lume_rows("forget", "sc1", 0, 1), lume_rows("retain", "sc1", 4, 5)
    callback = SemEvalCallback(*rows)
    resume_best(callback, str(tmp_path))
    assert (callback.best_step, callback.best_value) == (4, 0.5)  # a later 0.4 will not replace best/
    other = SemEvalCallback(*rows, objective="mia_final_score")
    resume_best(other, str(tmp_path))
    assert other.best_step is None  # best/ was chosen on another objective: the resumed run starts its own


def test_an_objective_no_evaluation_reports_is_an_error_before_training(workspace, capsys):
    line = error_line(capsys, workspace, "--validation_objective", "aggregate-scor")
    assert "validation_objective 'aggregate-scor': not among the validation results' keys" in line
    assert "'aggregate-score'" in line and "'retain-set/overall-regurgitation-score'" in line
    line = error_line(capsys, workspace, "--validation_objective", "mia_final_score")  # no non-members: no MIA score
    assert "validation_objective 'mia_final_score'" in line
    assert not (workspace / "run" / "trainer_state.json").exists()


RANK_SCRIPT = '''
import hashlib, json, os, sys
import torch
from peft import get_peft_model_state_dict
from gnm_trainer.cli.unlearn import parse_arguments, run_unlearning

trainer = run_unlearning(*parse_arguments(sys.argv[3:]))
weights = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))
report = {"digest": hashlib.sha256(b"".join(weights[k].cpu().numpy().tobytes() for k in sorted(weights))).hexdigest(),
          "kept": getattr(trainer, sys.argv[2])}
with open(os.path.join(sys.argv[1], f"rank{trainer.accelerator.process_index}.json"), "w") as handle:
    json.dump(report, handle)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


def digest(weights: dict) -> str:
    return hashlib.sha256(b"".join(weights[name].numpy().tobytes() for name in sorted(weights))).hexdigest()


def two_process_run_keeps_best(workspace, kept_attribute: str, *flags) -> None:
    """`gnm unlearn --config recipe.yaml` on two processes with batch 1 each (the ranks' batches differ; the
    single-process run's batch is 2): both keep the step in best/ and hold its weights (`kept_attribute` is where
    the trainer records the kept step)."""
    script, reports = workspace / "rank_script.py", workspace / "reports"
    script.write_text(RANK_SCRIPT)
    reports.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    for name in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    flags = ["--config", str(workspace / "recipe.yaml"), "--per_device_train_batch_size", "1", *flags]
    result = subprocess.run(
        [*launch, str(script), str(reports), kept_attribute, *flags],
        env=env, cwd=workspace, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{index}.json").read_text()) for index in (0, 1)]
    best = json.loads((workspace / "run" / "best" / "best.json").read_text())
    assert best["step"] < 6 and [rank["kept"]["step"] for rank in ranks] == [best["step"], best["step"]]
    best_digest = digest(load_file(workspace / "run" / "best" / "adapter_model.safetensors"))
    assert [rank["digest"] for rank in ranks] == [best_digest, best_digest]


def test_two_processes_evaluate_together_and_each_loads_the_best_step(workspace):
    """Every process runs the callback (its evaluation is sharded) and loads best/ into its own model."""
    two_process_run_keeps_best(workspace, "best_on_validation", "--learning_rate", "1e-1",
                               "--validation_mia_nonmembers", str(workspace))


def test_validation_options_without_validation_steps_are_an_error(workspace, capsys):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    del recipe["eval_on_validation_steps"]  # validation_max_new_tokens and validation_batch_size stay set
    (workspace / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    line = error_line(capsys, workspace)
    assert "validation_max_new_tokens, validation_batch_size: set, but nothing is evaluated" in line
    assert not (workspace / "run").exists()
