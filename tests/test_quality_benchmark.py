"""The quality benchmark in its smoke preset: every stage runs, the summary holds every figure, a re-run is cached.

The figures themselves are not asserted here (the smoke target memorises nothing); the benchmark's numbers are
in docs/results.md, measured by the cpu preset.
"""

import json
import os
import sys

from dataclasses import replace

import pytest
from conftest import LUME_DIR

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import quality  # noqa: E402
from quality_report import is_gibberish, qa_rouge_comparison  # noqa: E402

from gnm_trainer.recipes import membership_schedule  # noqa: E402


def test_lume_subset_keeps_documents_whole(tmp_path):
    from gnm_trainer.data.synthetic import make_synthetic_lume
    from gnm_trainer.target import document_key

    data = make_synthetic_lume(seed=0)
    subset = quality.lume_subset(data, {"train": {"Task1": 1, "Task2": 2, "Task3": 1}, "validation": None},
                                 heldout_per_task=1)
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
    # Every document left out is pretraining text or held out (one per task), never both, never a kept one.
    kept = {document_key(row["id"]) for key in quality_splits() for row in subset[key]}
    every = {document_key(row["id"]) for key in quality_splits() for row in data[key]}
    pretraining, heldout = ({row["id"] for row in subset[key]} for key in ("pretraining", "heldout"))
    assert pretraining | heldout == every - kept and not pretraining & heldout
    assert sorted(row["task"] for row in subset["heldout"]) == ["Task1", "Task2", "Task3"]
    some = subset["pretraining"][0]
    rows = [row for key in quality_splits() for row in data[key] if document_key(row["id"]) == some["id"]]
    assert all(row["input"] + " " + row["output"] in some["document"] for row in rows)


def quality_splits():
    return ("forget_train", "retain_train", "forget_validation", "retain_validation")


def test_each_method_stops_where_validation_scores_best():
    def point(step, final, collapsed=False, knowledge=1.0):
        return {"step": step, "hm12": final, "mia_score": final, "final_no_mmlu": final, "collapsed": collapsed,
                **{f"retain_Task{task}_K": knowledge for task in (1, 2, 3)}}

    records = [
        {"loss_terms": ["ga"], "weights": {"ga": 0.5},
         "curve": [point(2, 0.4), point(4, 0.9, collapsed=True), point(6, 0.8, knowledge=0.85)]},
        {"loss_terms": ["ga", "gd"], "weights": {"ga": 1.0}, "curve": [point(2, 0.6), point(4, 0.6)]},
    ]
    choice = quality.choose_on_validation(records, target_retain_knowledge=1.0)
    assert (choice["loss_terms"], choice["weights"], choice["step"]) == (["ga", "gd"], {"ga": 1.0}, 2)  # ties: fewer
    assert len(choice["table"]) == 5  # collapsed points and those below 0.9x the retain knowledge are reported
    assert quality.choose_on_validation(records, target_retain_knowledge=0.9)["step"] == 6  # 0.85 >= 0.81
    only_collapsed = quality.choose_on_validation([{**records[0], "curve": [point(2, 0.9, collapsed=True)]}])
    assert not only_collapsed["eligible"]
    assert quality.recommend({"A": only_collapsed, "B": choice}) == "B"  # a better but ineligible method is not


def test_train_runs_last_as_many_epochs_as_the_choice_on_validation():
    rows = {"forget_train": 224, "forget_validation": 82}
    assert quality.in_train_steps(84, rows) == 229 and quality.in_train_steps(21, rows) == 57
    assert quality.in_train_steps(1, {"forget_train": 2, "forget_validation": 8}) == 1  # at least one step
    method = quality.METHODS[0]
    choice = {"loss_terms": list(method.loss_terms), "weights": dict(method.weights), "step": 42}
    jobs = quality.train_jobs(quality.PRESETS["cpu"], [method], {method.name: choice}, rows)
    assert [(job.seed, job.max_steps, job.eval_every) for job in jobs] == [(0, 115, 115), (1, 115, 115), (2, 115, 115)]
    every_interval = replace(quality.PRESETS["cpu"], curve_every=None)  # the curve seed at every validation interval
    assert [job.eval_every for job in quality.train_jobs(every_interval, [method], {method.name: choice}, rows)] == [
        57, 115, 115]


def test_the_recommended_recipe_runs_in_a_window_around_the_chosen_length_and_keeps_a_step_on_membership():
    rows = {"forget_train": 208, "forget_validation": 84}
    method = quality.METHODS[0]
    choice = {"loss_terms": list(method.loss_terms), "weights": dict(method.weights), "step": 63}  # 156 train steps
    kept = quality.train_jobs(quality.PRESETS["cpu"], [method], {method.name: choice}, rows, recommended=method.name)
    assert [(job.name, job.seed, job.max_steps, job.keep_best_membership, job.save_adapter) for job in kept] == [
        ("recommended_seed0", 0, 208, (104, 13), True), ("recommended_seed1", 1, 208, (104, 13), False),
        ("recommended_seed2", 2, 208, (104, 13), False)]  # from 2/3 to 4/3 of 156 steps, scored every 13
    assert {job.method.name for job in kept} == {quality.recommended_row(method.name)}
    assert {(job.method.loss_terms, job.method.weights) for job in kept} == {(method.loss_terms, method.weights)}
    # The method's own row (156 steps, seed 0 evaluated every 104: 42 validation steps) is recorded on the way by
    # the same runs:
    plain = quality.train_jobs(quality.PRESETS["cpu"], [method], {method.name: choice}, rows)  # none asked
    assert [job.fixed_length for job in kept] == [
        quality.FixedLengthRow(job.name, method.name, job.max_steps, job.eval_every, job.save_adapter) for job in plain]
    assert [(job.max_steps, job.eval_every) for job in plain] == [(156, 104), (156, 156), (156, 156)]  # curve: 42
    # Another method kept on membership as the recommended recipe is, to compare the two on equal terms:
    other = quality.train_jobs(quality.PRESETS["cpu"], [method], {method.name: choice}, rows,
                               kept_on_membership=(method.name,))
    assert [(job.name, job.keep_best_membership) for job in other] == [
        (f"ga_kept-on-membership_seed{seed}", (104, 13)) for seed in (0, 1, 2)]
    assert {job.method.name for job in other} == {quality.membership_row(method.name)} == {"GA, step kept on membership"}
    assert [job.fixed_length for job in other] == [job.fixed_length for job in kept]
    both = quality.train_jobs(quality.PRESETS["cpu"], [method], {method.name: choice}, rows, recommended=method.name,
                              kept_on_membership=(method.name,))
    assert [job.fixed_length is not None for job in both] == [True] * 3 + [False] * 3  # recorded once
    merged = next(method for method in quality.METHODS if method.merged)  # its runs have no step to share
    choice = {"loss_terms": list(merged.loss_terms), "weights": dict(merged.weights), "step": 63}
    jobs = quality.train_jobs(quality.PRESETS["cpu"], [merged], {merged.name: choice}, rows, recommended=merged.name)
    assert [(job.name, job.fixed_length) for job in jobs] == [
        *((f"{quality.slug(merged.name)}_seed{seed}", None) for seed in (0, 1, 2)),
        *((f"recommended_seed{seed}", None) for seed in (0, 1, 2))]


def test_a_variant_of_the_gnm_grid_is_chosen_and_trained_with_its_own_options():
    """Two variants with the same terms and weights differ only by their options (SimNPO's margin): the choice names
    the one that scored best, and the train runs get its options."""
    tuned = next(method for method in quality.METHODS if method.grid)
    assert all(dict(variant.options).get("forget_completion_only_loss") is False for variant in tuned.grid)
    first, twin = next((a, b) for i, a in enumerate(tuned.grid) for b in tuned.grid[i + 1:]
                       if (a.loss_terms, a.weights) == (b.loss_terms, b.weights) and a.options != b.options)
    curve = {"step": 21, "hm12": 0.5, "mia_score": 0.5, "final_no_mmlu": 0.5, "collapsed": False,
             **{f"retain_Task{task}_K": 1.0 for task in (1, 2, 3)}}
    records = [{"loss_terms": list(variant.loss_terms), "weights": dict(variant.weights),
                "options": dict(variant.options), "curve": [{**curve, "final_no_mmlu": final}]}
               for variant, final in ((first, 0.4), (twin, 0.6))]
    choice = quality.choose_on_validation(records)
    assert choice["options"] == dict(twin.options) != dict(first.options)
    preset = quality.PRESETS["cpu"]
    assert quality.chosen_variant(tuned, choice, preset) == twin
    jobs = quality.train_jobs(preset, [tuned], {tuned.name: choice}, {"forget_train": 82, "forget_validation": 82})
    assert {job.method for job in jobs} == {twin}
    names = [job.name for job in quality.validation_jobs(preset, [tuned])]
    assert len(names) == len(set(names)) == len(tuned.grid)  # the two twins do not share a cache file


def test_methods_option_selects_a_subset_by_name_or_slug():
    preset = quality.PRESETS["cpu"]
    chosen = quality.select_methods("ga, SimNPO+GD,gnm-paper", preset)
    assert [method.name for method in chosen] == ["GA", "SimNPO+GD", "GNM (paper)"]
    assert len(quality.select_methods(None, preset)) == len(preset.methods)
    with pytest.raises(SystemExit, match="unknown.*'nope'"):
        quality.select_methods("ga,nope", preset)
    # --kept_on_membership adds its methods to the run (in METHODS' order) when they are not in it:
    assert quality.ABLATION not in preset.methods
    methods, kept = quality.run_methods("gnm-paper,ga", "simnpo-klb-gd-margin-at-the-reference-level-whole-documents-no-gnm,ga", preset)
    assert [method.name for method in methods] == ["GA", "GNM (paper)", quality.ABLATION]
    assert kept == ("GA", quality.ABLATION)
    assert quality.run_methods(None, "", preset) == (quality.select_methods(None, preset), ())


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
    recommended, row = summary["run"]["recommended"]["method"], summary["run"]["recommended"]["row"]
    assert set(summary["methods"]) == set(preset.methods) | {row}
    rows = summary["run"]["target"]["rows"]
    for name, curves in summary["methods"].items():
        assert len(curves) == len(preset.seeds)
        choice = summary["run"]["choices"][recommended if name == row else name]
        steps = quality.in_train_steps(choice["step"], rows)  # the epochs validation chose
        for curve in curves:
            if name == row:  # scored once, at the step kept in the window around them
                first, last, _ = membership_schedule(steps)
                assert len(curve) == 1 and first <= curve[0]["step"] <= last
            else:
                assert curve[-1]["step"] == steps
            final = curve[-1]
            for key in ("hm12", "mia_auc", "mia_score", "final_no_mmlu", "qa_rougeL_forget", "qa_rougeL_retain",
                        "heldout_nll", "gibberish_retain", "collapsed", "forget_Task2_K", "retain_Task2_R"):
                assert final[key] is not None, key
    tuned = summary["run"]["choices"]["GNM (tuned on validation)"]
    assert {(tuple(row["loss_terms"]), json.dumps(row["weights"], sort_keys=True)) for row in tuned["table"]} == {
        (variant.loss_terms, json.dumps(dict(variant.weights), sort_keys=True))
        for variant in quality.GNM_GRID[: preset.grid_points]}
    for method in (*preset.methods, row):  # every method's seed-0 adapter was attacked, each attack with its figures
        for attack in preset.attacks:
            assert summary["attacks"][method][attack]["forget-set"]["overall"]["mean"] is not None
    report = summary["run"]["target_report"]
    assert report["nonmember_nll"] < report["uniform_nll"] and report["heldout_Task2_nll"] is not None
    # SimNPO's margins sit around the reference documents' NLL, never read off the reported non-members.
    margins = {row["options"]["simnpo_delta"] for row in tuned["table"]}
    assert margins == {round(report["reference_nll"] + offset, 1) for offset in (-0.5, 0.0, 0.5)[: preset.grid_points]}
    assert summary["run"]["target"]["pretraining"]["documents"] > 0
    for name in ("summary.md", "summary.json", "tradeoff.png", "before.json", "negatives/perturb_validation.jsonl"):
        assert (output / name).is_file(), name
    markdown = (output / "summary.md").read_text()
    assert "| GNM (paper) |" in markdown and "quant8 recovery" in markdown and f"| {row} |" in markdown
    assert f"{row}:" in markdown  # its table of membership scores by step
    # The recommended method's own rows were recorded on the way by the recommended recipe's runs (a merged method's
    # runs have no step to share: unit-tested above):
    shares_runs = not next(method for method in quality.METHODS if method.name == recommended).merged
    for seed in preset.seeds if shares_runs else ():
        shared = json.loads((output / "runs" / f"recommended_seed{seed}.json").read_text())["fixed_length_record"]
        assert (shared["name"], shared["method"], shared["recorded_by"]) == (
            f"{quality.slug(recommended)}_seed{seed}", recommended, f"recommended_seed{seed}")
        assert not (output / "runs" / f"{shared['name']}.json").exists()
    if shares_runs:
        assert f"| {recommended} | {shared['max_steps']} (of the runs recommended) |" in markdown
    assert json.loads((output / "summary.json").read_text())["run"]["preset"] == "smoke"

    runs = sorted((output / "runs").iterdir()) + sorted((output / "attacks").iterdir())
    stamps = [path.stat().st_mtime_ns for path in runs]
    capsys.readouterr()
    quality.main(command)
    assert capsys.readouterr().out.count("0 to run") == 3  # validation, comparison and attacks all from cache
    assert [path.stat().st_mtime_ns for path in runs] == stamps  # nothing re-ran


def test_margins_are_resolved_from_the_reference_level():
    method = quality.Method("m", ("simnpo", "gd"), options=(("simnpo_delta", quality.ReferenceMargin(-0.5)),
                                                            ("forget_chunks", 2)),
                            grid=(quality.Method("v", ("simnpo",), options=(("simnpo_delta", quality.ReferenceMargin(0.5)),)),))
    [resolved] = quality.resolve_margins([method], 5.47)
    assert dict(resolved.options) == {"simnpo_delta": 5.0, "forget_chunks": 2}
    assert dict(resolved.grid[0].options) == {"simnpo_delta": 6.0}
    assert str(quality.ReferenceMargin(-0.5)) == "referenceminus0.5" != str(quality.ReferenceMargin(0.5))


# ---- issue 24: ZJUKLAB's two adapters read the same epochs; a preset the data cannot fill is one line ----------


def test_merged_adapters_read_the_same_epochs_the_over_forgetting_one_at_half_the_batch(monkeypatch, tmp_path):
    """Their code trains both adapters for 5 epochs, the over-forgetting one (NPO/KL/GD 0.4/0.4/0.2) at batch 1 and
    the under-forgetting one (0.3/0.3/0.4) at batch 2: here at half the preset's batch and at the preset's batch."""
    from types import SimpleNamespace

    import transformers

    method = next(method for method in quality.METHODS if method.merged)
    over, under = method.merged
    assert dict(over.weights) == {"npo": 0.4, "klr": 0.4, "gd": 0.2} and over.batch_share == 0.5
    assert dict(under.weights) == {"npo": 0.3, "klr": 0.3, "gd": 0.4} and under.batch_share == 1.0
    calls = []

    class Merging(Exception):
        pass

    def recorded_unlearn(model, tokenizer, method, weights, partition, seed, max_steps, preset, workspace, scratch,
                         callbacks=(), batch_size=None):
        calls.append((dict(weights), batch_size, max_steps))
        return SimpleNamespace(model=SimpleNamespace(save_pretrained=lambda path: None))

    def merging(*args, **kwargs):
        raise Merging

    monkeypatch.setattr(quality, "unlearn", recorded_unlearn)
    monkeypatch.setattr("gnm_trainer.merging.merge_adapters", merging)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: None)
    preset = quality.PRESETS["cpu"]  # batch 8
    job = quality.Job("merged", method, 0, "train", max_steps=84, eval_every=21)
    workspace = quality.Workspace(str(tmp_path), str(tmp_path / "target"))
    with pytest.raises(Merging):
        quality.merged_model(job, preset, workspace, SimpleNamespace(save_pretrained=lambda path: None),
                             str(tmp_path / "scratch"))
    assert [(weights, batch, steps) for weights, batch, steps in calls] == [
        (dict(over.weights), 4, 168), (dict(under.weights), 8, 84)]
    assert len({batch * steps for _, batch, steps in calls}) == 1  # the same examples, so the same epochs


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_a_preset_the_data_cannot_fill_is_one_line_before_any_work(tmp_path, capsys, preset):
    output = tmp_path / "quality"
    with pytest.raises(SystemExit) as raised:
        quality.main(["--preset", preset, "--data", "synthetic", "--output", str(output), "--threads", "1"])
    message = str(raised.value.code)
    assert "\n" not in message
    assert message.startswith(f"quality: --preset {preset} needs more than --data synthetic holds: forget_train: ")
    assert "MIA non-members: 150" in message and "it has 24)" in message and "use --preset smoke" in message
    assert not output.exists() and capsys.readouterr().out == ""  # nothing built, nothing said before


def test_the_smoke_preset_fits_the_synthetic_data_and_every_preset_fits_lume():
    cases = [("smoke", "synthetic")]
    if os.path.isdir(LUME_DIR):
        cases += [(name, LUME_DIR) for name in ("smoke", "cpu", "gpu")]
    for name, source in cases:
        preset = quality.PRESETS[name]
        data = quality.load_benchmark_data(source)
        subset = quality.lume_subset(data, preset.documents, heldout_per_task=preset.heldout_per_task)
        assert quality.preset_shortfalls(preset, data, subset, uses_base=True) == [], (name, source)


def test_the_recommended_recipe_never_comes_from_a_merge_of_two_runs(capsys):
    """The recommended recipe keeps a step of one run on membership; a merged method has no step to keep (the smoke
    run recommended it once its adapters read the same epochs, and its row had no membership scores)."""
    methods = [method for method in quality.METHODS if method.name in ("GA", "Merged NPO+GD+KL (ZJUKLAB)")]
    choices = {"GA": {"eligible": True, "final": 0.2}, "Merged NPO+GD+KL (ZJUKLAB)": {"eligible": True, "final": 0.9}}
    assert quality.recommend(quality.recommendable(methods, choices)) == "GA"
    with pytest.raises(SystemExit, match="--kept_on_membership: .*merge two runs"):
        quality.run_methods(None, "merged-npo-gd-kl-zjuklab", quality.PRESETS["cpu"])
