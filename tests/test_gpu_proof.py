"""Issue 14's one GPU run (benchmarks/gpu_proof.py), checked on the CPU: its recipes stage end to end in its dry run
(the recipes through the real `gnm unlearn`, bf16 against fp32), the comparisons each stage's verdict rests on, and
what a stage cut short leaves behind. The GPU figures themselves come from running it on a GPU machine."""

import json
import os
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import gpu_proof  # noqa: E402
from gpu_evaluate import compare_evaluations  # noqa: E402
from gpu_recipes import BF16_TOLERANCE, compare_losses  # noqa: E402


def test_recipes_stage_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    code = gpu_proof.main(["--dry-run", "--only", "recipes", "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 0
    assert sorted(os.listdir(out)) == ["gpu_logs.tar.gz", "gpu_proof.json", "gpu_proof.md"]  # what a GPU run sends back
    stage = json.loads((out / "gpu_proof.json").read_text())["stages"]["recipes"]
    assert stage["passed"] is True and stage["exit_code"] == 0
    recipes = stage["record"]["recipes"]
    paper, recommended = recipes["paper"], recipes["recommended"]
    assert paper["gpu"]["peft_type"] == "ADALORA" and paper["gpu"]["reference_mode"] == "adapter_disabled"
    assert recommended["gpu"]["peft_type"] == "LORA" and recommended["gpu"]["kept_step"] is not None
    for runs in recipes.values():
        assert len(runs["gpu"]["steps"]) == len(runs["cpu"]["steps"]) == 4  # logged every step
        assert runs["comparison"]["matches"] is True
        # the bf16 run really ran in bf16: its losses are not the fp32 run's, yet within the tolerance
        assert 0 < max(runs["comparison"]["largest_difference"].values()) < BF16_TOLERANCE["absolute"]
        assert "--dtype float32 --bf16 false" in runs["cpu"]["command"]
    assert {"ga", "klr", "gnm"} <= {key.removeprefix("loss_") for key in paper["cpu"]["steps"][0]}
    assert {"simnpo", "klb", "gd", "gnm"} <= {key.removeprefix("loss_") for key in recommended["cpu"]["steps"][0]}
    summary = (out / "gpu_proof.md").read_text()
    assert "| 1. paper and recommended recipes" in summary and "# Recipes through `gnm unlearn`" in summary
    with tarfile.open(out / "gpu_logs.tar.gz") as archive:
        names = archive.getnames()
    assert "logs/recipes.log" in names
    assert {f"stage_logs/recipe-{name}-{device}.log" for name in recipes for device in ("gpu", "cpu")} <= set(names)


def test_compare_losses_within_and_out_of_tolerance():
    cpu = [{"loss": 1.0, "loss_ga": -6.0, "loss_klr": 0.0}, {"loss": 1.1, "loss_ga": -6.1, "loss_klr": 0.001}]
    close = [{key: value + 0.01 for key, value in step.items()} for step in cpu]
    result = compare_losses(close, cpu)
    assert result["matches"] is True and result["largest_difference"]["loss_ga"] == pytest.approx(0.01)
    far = [dict(step) for step in cpu]
    far[1]["loss_klr"] = 0.5
    result = compare_losses(far, cpu)
    assert result["matches"] is False and result["first_out_of_tolerance"]["step"] == 2
    assert result["first_out_of_tolerance"]["term"] == "loss_klr"
    assert compare_losses(cpu[:1], cpu)["matches"] is False  # a run that stopped early
    assert compare_losses([{"loss": 1.0}, {"loss": 1.1}], cpu)["matches"] is False  # other terms
    nan = [dict(step, loss=float("nan")) for step in cpu]
    assert compare_losses(nan, cpu)["matches"] is False


def write_evaluation(folder, results: dict, generations: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    (folder / "evaluation_results.json").write_text(json.dumps(results))
    rows = [{"id": key, "split": "forget", "generation": text} for key, text in generations.items()]
    (folder / "per_example.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(folder)


def test_compare_evaluations(tmp_path):
    results = {"forget-set": {"Task1": {"regurgitation-score": 0.5}}, "aggregate-score": 0.4,
               "mia_mean_nll": {"members": 2.0, "nonmembers": 3.0}, "aggregated-terms": [0.5],
               "settings": {"batch_size": 16}}  # fmt: skip
    cpu = write_evaluation(tmp_path / "cpu", results, {"a": "x y", "b": "z"})
    other_batch = dict(json.loads(json.dumps(results)), settings={"batch_size": 4})
    same = write_evaluation(tmp_path / "same", other_batch, {"a": "x y", "b": "z"})
    comparison = compare_evaluations(same, cpu)
    assert comparison["agree"] is True and comparison["generations_differing"] == 0  # the batch size is no score
    assert set(comparison["scores"]) == {"forget-set/Task1/regurgitation-score", "aggregate-score"}
    assert set(comparison["mean_nll_relative_difference"]) == {"mia_mean_nll/members", "mia_mean_nll/nonmembers"}
    shifted = json.loads(json.dumps(results))
    shifted["forget-set"]["Task1"]["regurgitation-score"] = 0.55
    other = write_evaluation(tmp_path / "other", shifted, {"a": "x y", "b": "w"})
    comparison = compare_evaluations(other, cpu)
    assert comparison["agree"] is False and comparison["generations_differing"] == 1
    assert comparison["largest_score_difference"]["score"] == "forget-set/Task1/regurgitation-score"
    nll = json.loads(json.dumps(results))
    nll["mia_mean_nll"]["members"] = 2.01  # 0.5% off: over the NLL tolerance
    assert compare_evaluations(write_evaluation(tmp_path / "nll", nll, {"a": "x y", "b": "z"}), cpu)["agree"] is False


def test_a_stage_cut_short_keeps_what_it_wrote(tmp_path):
    results, logs, out = tmp_path / "results", tmp_path / "logs", tmp_path / "out"
    results.mkdir()
    speed_stage = next(stage for stage in gpu_proof.STAGES if stage.name == "speed")
    # speed.py writes its JSON after each measurement: killed during (c), it holds (a) and (b) only
    (results / "speed.json").write_text(json.dumps({"figures": {"a": {}, "b": {}}, "table": "| a | ... |",
                                                    "verdicts": {"a": ">= 3x PASS", "b": "<= 1.2x PASS"}}))  # fmt: skip
    outcome = gpu_proof.stage_outcome(speed_stage, str(results), {"exit_code": 124, "wall_seconds": 170.0,
                                                                 "log_tail": "Terminated"})  # fmt: skip
    assert outcome["passed"] is False and "not measured: c, d, e" in outcome["summary"]
    assert outcome["log_tail"] == "Terminated"
    (results / "speed.json").write_text(json.dumps({"figures": dict.fromkeys("abcde", {}),
                                                    "verdicts": {"a": ">= 3x PASS", "d": ">= 5x MISS"}}))  # fmt: skip
    ran = {"exit_code": 0, "wall_seconds": 99.0}
    assert gpu_proof.stage_outcome(speed_stage, str(results), ran)["passed"] is False  # a target missed
    assert gpu_proof.stage_outcome(speed_stage, str(results), ran, dry_run=True)["passed"] is True  # none applies
    recipes_stage = gpu_proof.STAGES[0]
    (results / "gpu_recipes.json").write_text(json.dumps({"recipes": {"paper": {"gpu": {"exit_code": 0}}}}))
    cut = gpu_proof.stage_outcome(recipes_stage, str(results), {"exit_code": "timeout"})
    assert cut["passed"] is False and "a run did not finish" in cut["summary"]
    missing = gpu_proof.stage_outcome(gpu_proof.STAGES[1], str(results), {"exit_code": 1})
    assert missing["passed"] is False and missing["summary"] == "wrote no figures (exit 1)"
    settings = {"device": "test", "date": "today", "torch": "x", "command": "gpu_proof.py"}
    gpu_proof.write_outputs(str(out), str(results), str(logs), settings, {"speed": outcome, "recipes": cut})
    summary = (out / "gpu_proof.md").read_text()
    assert summary.index("1. paper") < summary.index("3. speed.py")  # in the order the stages run
    assert "| a | ... |" in summary  # the speed table of what was measured


def test_missing_packages_stop_the_run_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_proof, "REQUIRED_MODULES", ("transformers", "no_such_module_gnm"))
    assert gpu_proof.main(["--dry-run", "--out", str(tmp_path / "out")]) == 2
    assert "missing Python packages: no_such_module_gnm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, nothing run


def test_stage_budgets_fit_the_issue_and_only_picks_stages():
    assert sum(stage.seconds for stage in gpu_proof.STAGES) <= 9 * 60 - 30  # under 9 minutes, with room to start
    assert [stage.name for stage in gpu_proof.parse_args(["--only", "speed,recipes"]).stages] == ["recipes", "speed"]
    with pytest.raises(SystemExit):
        gpu_proof.parse_args(["--only", "recipes,gpu"])
    command = gpu_proof.stage_command(gpu_proof.STAGES[2], "/r", "/w", 150, dry_run=False)
    assert command[command.index("--max-processes") + 1] == "1" and command[command.index("--budget") + 1] == "140"
