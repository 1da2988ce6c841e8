"""The quality benchmark in its smoke preset: every stage runs, the summary holds every figure, a re-run is cached.

The figures themselves are not asserted here (the smoke target memorises nothing); the benchmark's numbers are
in docs/results.md, measured by the cpu preset.
"""

import json
import os
import sys

import pytest
from conftest import LUME_DIR

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import quality  # noqa: E402
from quality_report import is_gibberish, qa_rouge_comparison  # noqa: E402


def test_lume_subset_keeps_documents_whole(tmp_path):
    from gnm_trainer.data.synthetic import make_synthetic_lume
    from gnm_trainer.target import document_key

    data = make_synthetic_lume(seed=0)
    subset = quality.lume_subset(data, {"train": {"Task1": 1, "Task2": 2, "Task3": 1}, "validation": None})
    for key in ("forget_train", "retain_train"):
        documents = {}
        for row in subset[key]:
            documents.setdefault(row["task"], set()).add(document_key(row["id"]))
        assert {task: len(keys) for task, keys in documents.items()} == {"Task1": 1, "Task2": 2, "Task3": 1}
        kept = {document_key(row["id"]) for row in subset[key]}
        whole = [row for row in data[key] if document_key(row["id"]) in kept]
        assert subset[key] == whole  # every row of a kept document, in the original order
    assert subset["forget_validation"] == data["forget_validation"]  # None keeps the whole partition
    forget_documents = {document_key(row["id"]) for row in subset["forget_train"]}
    assert {row["id"] for row in subset["mia_member"]} <= forget_documents


def test_choose_weights_reads_validation_only():
    records = [
        {"weights": {"ga": 0.5, "gnm": 0.04}, "curve": [{"step": 2, "hm12": 0.3}]},
        {"weights": {"ga": 1.0, "gnm": 0.2}, "curve": [{"step": 1, "hm12": 0.9}, {"step": 2, "hm12": 0.6}]},
        {"weights": {"ga": 0.25, "gnm": 1.0}, "curve": [{"step": 2, "hm12": 0.6}]},
    ]
    weights, table = quality.choose_weights(records)
    assert weights == (("ga", 1.0), ("gnm", 0.2))  # the final point counts; ties go to the earlier grid point
    assert [row["hm12"] for row in table] == [0.3, 0.6, 0.6]


def test_gibberish_and_qa_comparison():
    assert is_gibberish("") and is_gibberish("the the the the the the the the the")
    assert not is_gibberish("Paris") and not is_gibberish("she was born in Paris in 1901 and moved to Lyon")
    final = lambda forget, retain: [{"curve": [{"qa_rougeL_forget": forget, "qa_rougeL_retain": retain}]}]  # noqa: E731
    comparison = qa_rouge_comparison({"GA": final(0.2, 0.6), "GA+GD": final(0.5, 0.8), "GNM (paper)": final(0.1, 0.7)})
    assert comparison["baseline_mean_gap"] == pytest.approx(0.35)  # gaps: GA 0.4, GA+GD 0.3, GNM 0.6
    assert comparison["gnm_relative_to_baselines"]["GNM (paper)"] == pytest.approx(0.25 / 0.35)
    assert comparison["best_baseline"] == "GA"
    assert comparison["gnm_relative_to_best_baseline"]["GNM (paper)"] == pytest.approx(0.5)


def test_smoke_preset_runs_end_to_end_and_caches(tmp_path, capsys):
    output = tmp_path / "quality"
    data = LUME_DIR if os.path.isdir(LUME_DIR) else "synthetic"  # the script's own default would ask the Hub
    command = ["--preset", "smoke", "--data", data, "--output", str(output), "--threads", "1"]
    summary = quality.main(command)
    preset = quality.PRESETS["smoke"]
    assert set(summary["methods"]) == set(preset.methods)
    for curves in summary["methods"].values():
        assert len(curves) == len(preset.seeds)
        for curve in curves:
            assert [point["step"] for point in curve] == [2, 4]
            final = curve[-1]
            for key in ("hm12", "mia_auc", "mia_score", "final_no_mmlu", "qa_rougeL_forget", "qa_rougeL_retain",
                        "heldout_nll", "gibberish_retain", "collapsed", "forget_Task2_K", "retain_Task2_R"):
                assert final[key] is not None, key
    grid = [tuple(sorted(row["weights"].items())) for row in summary["run"]["tuning"]]
    assert grid == [tuple(sorted(point)) for point in preset.tuning_grid]
    assert tuple(sorted(summary["run"]["tuned_weights"].items())) in grid
    for name in ("summary.md", "summary.json", "tradeoff.png", "before.json", "negatives/llm_train.jsonl"):
        assert (output / name).is_file(), name
    assert "| GNM (paper) |" in (output / "summary.md").read_text()
    assert json.loads((output / "summary.json").read_text())["run"]["preset"] == "smoke"

    runs = sorted((output / "runs").iterdir())
    stamps = [path.stat().st_mtime_ns for path in runs]
    capsys.readouterr()
    quality.main(command)
    assert "0 to run" in capsys.readouterr().out
    assert [path.stat().st_mtime_ns for path in runs] == stamps  # nothing re-ran
