"""What the quality benchmark measures on one model, and how its runs are summed up (tables, JSON, plot).

Measured per evaluation (`measure_model`):
- the official SemEval-2025 Task 4 metric through `gnm_trainer.evaluation.evaluate_model`: regurgitation R and
  knowledge K per task and split, HM12, MIA AUC and score, and the final score without MMLU (mean of HM12 and the
  MIA score);
- `qa_rougeL_forget` / `qa_rougeL_retain`: mean ROUGE-L F-measure (stemmed) of the QA rows, the score the paper
  reports for QA;
- `heldout_nll`: mean token NLL of held-out Wikipedia documents the target never saw, the utility proxy
  standing in for MMLU (lower is better; it rises when unlearning damages the language model);
- `mia_member_nll` / `mia_nonmember_nll`: the mean document NLL of the attack's members and non-members, what the
  attack compares (the MIA score is best when the two distributions are alike);
- `gibberish_retain`: share of retain generations that are empty or degenerate (fewer than 30% distinct words
  among at least 8), and `collapsed`: retain knowledge (mean K over tasks) below 0.05 or more than half of the
  retain generations gibberish.
"""

import json
import math
import os
import statistics
from collections.abc import Sequence

from gnm_trainer.evaluation.semeval import rouge_l
from gnm_trainer.io_utils import atomic_path, atomic_write_json, atomic_write_text

TASKS = ("Task1", "Task2", "Task3")
SPLITS = {"forget": "forget-set", "retain": "retain-set"}


def is_gibberish(text: str) -> bool:
    """Empty, or at least 8 words of which fewer than 30% are distinct (a loop of the same few words)."""
    words = text.lower().split()
    if not words:
        return True
    return len(words) >= 8 and len(set(words)) / len(words) < 0.3


def qa_rouge(rows: Sequence[dict], split: str) -> float | None:
    scores = [rouge_l(row["reference"], row["generation"]).fmeasure
              for row in rows if row["split"] == split and row["kind"] == "qa"]
    return sum(scores) / len(scores) if scores else None


def _mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def measure_model(model, tokenizer, forget, retain, documents: dict | None, preset) -> tuple[dict, list[dict]]:
    """Every figure of one evaluation (see the module docstring) and the per-example rows; `documents` None skips
    MIA and utility."""
    from gnm_trainer.evaluation import evaluate_model
    from gnm_trainer.evaluation.generation import document_nll

    mia = {"mia_members": documents["members"], "mia_nonmembers": documents["nonmembers"]} if documents else {}
    results, rows = evaluate_model(model, tokenizer, forget, retain, max_new_tokens=preset.max_new_tokens,
                                   batch_size=preset.eval_batch_size, show_progress=False, **mia)
    metrics: dict = {}
    for split, key in SPLITS.items():
        for task in TASKS:
            scores = results.get(key, {}).get(task, {})
            metrics[f"{split}_{task}_R"] = scores.get("regurgitation-score")
            metrics[f"{split}_{task}_K"] = scores.get("knowledge-score")
        metrics[f"qa_rougeL_{split}"] = qa_rouge(rows, split)
    metrics["hm12"] = results["harmonic-mean-task-aggregate"]
    metrics["mia_auc"] = results["mia_loss_acc"]
    metrics["mia_score"] = results["mia_final_score"]
    metrics["final_no_mmlu"] = results["aggregate-score"] if documents else None
    mean_nll = results.get("mia_mean_nll") or {}
    metrics["mia_member_nll"], metrics["mia_nonmember_nll"] = mean_nll.get("members"), mean_nll.get("nonmembers")
    if documents and documents["heldout"]:
        was_training = model.training
        model.eval()
        metrics["heldout_nll"] = _mean(document_nll(model, tokenizer, documents["heldout"],
                                                    batch_size=preset.eval_batch_size))
        model.train(was_training)
    else:
        metrics["heldout_nll"] = None
    retain_rows = [row for row in rows if row["split"] == "retain"]
    metrics["gibberish_retain"] = sum(is_gibberish(row["generation"]) for row in retain_rows) / max(1, len(retain_rows))
    retain_knowledge = _mean(metrics[f"retain_{task}_K"] for task in TASKS)
    metrics["collapsed"] = bool((retain_knowledge is not None and retain_knowledge < 0.05)
                                or metrics["gibberish_retain"] > 0.5)
    metrics["forgetting"] = _mean(1 - metrics[f"forget_{task}_{score}"] for task in TASKS for score in "RK"
                                  if metrics[f"forget_{task}_{score}"] is not None)
    metrics["retention"] = _mean(metrics[f"retain_{task}_{score}"] for task in TASKS for score in "RK")
    return metrics, rows


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------


def mean_sd(values: Sequence) -> tuple[float | None, float | None]:
    values = [float(value) for value in values if value is not None and not math.isnan(float(value))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: Sequence, digits: int = 2) -> str:
    mean, sd = mean_sd(values)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def by_method(records: Sequence[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["method"], []).append(record)
    return grouped


MAIN_COLUMNS = (
    ("HM12 ↑", "hm12"), ("MIA AUC (→0.5)", "mia_auc"), ("MIA score ↑", "mia_score"),
    ("final w/o MMLU ↑", "final_no_mmlu"), ("QA ROUGE-L forget ↓", "qa_rougeL_forget"),
    ("QA ROUGE-L retain ↑", "qa_rougeL_retain"), ("held-out NLL ↓", "heldout_nll"),
    ("MIA members' NLL", "mia_member_nll"), ("MIA non-members' NLL", "mia_nonmember_nll"),
)


def attack_figure(attacks: dict[str, dict], method: str, attack: str, key: str) -> float | None:
    """An attack's overall figure on `method`'s attacked run: `recovery` or `forget-set` (mean of R and K)."""
    figures = attacks.get(method, {}).get(attack) or {}
    return ((figures.get(key) or {}).get("overall") or {}).get("mean")


def steps_cell(runs: Sequence[dict]) -> str:
    """The steps of a method's runs: their length (and the runs that recorded them on their way, if any), or for
    runs that kept a step on membership, each kept step."""
    if "recorded_by" in runs[0]:
        return f"{runs[0]['max_steps']} (of the runs {runs[0]['recorded_by'].rsplit('_seed', 1)[0]})"
    if "kept_step" not in runs[0]:
        return str(runs[0]["max_steps"])
    return f"{', '.join(str(run['kept_step']) for run in runs)} of {runs[0]['max_steps']}"


def main_table(before: dict, grouped: dict[str, list[dict]], attacks: dict[str, dict], attack_names) -> str:
    attack_header = "".join(f" {name} recovery ↓ |" for name in attack_names)
    header = ("| method | steps | " + " | ".join(name for name, _ in MAIN_COLUMNS) + " | collapsed runs |"
              + attack_header)
    lines = [header, "|" + "---|" * (len(MAIN_COLUMNS) + 3 + len(attack_names))]
    report = before.get("target_report") or {}  # the same documents' mean NLL, from the target's report
    target = {"mia_member_nll": report.get("member_nll"), "mia_nonmember_nll": report.get("nonmember_nll"), **before}
    lines.append("| target (before) | 0 | " + " | ".join(_fmt(target.get(key)) for _, key in MAIN_COLUMNS) + " | – |"
                 + " – |" * len(attack_names))
    for method, runs in grouped.items():
        finals = [run["curve"][-1] for run in runs]
        collapsed = sum(final["collapsed"] for final in finals)
        values = " | ".join(cell([final[key] for final in finals]) for _, key in MAIN_COLUMNS)
        recovered = "".join(f" {_fmt(attack_figure(attacks, method, name, 'recovery'))} |" for name in attack_names)
        lines.append(f"| {method} | {steps_cell(runs)} | {values} | {collapsed}/{len(finals)} |{recovered}")
    return "\n".join(lines)


def attack_table(grouped: dict[str, list[dict]], attacks: dict[str, dict], attack_names) -> str:
    """Forget score (mean of R and K over the forget rows) of the target, the unlearned model and each attack."""
    lines = ["| method | target | unlearned | " + " | ".join(f"after {name}" for name in attack_names) + " |",
             "|" + "---|" * (len(attack_names) + 3)]
    for method in grouped:
        figures = attacks.get(method)
        if not figures:
            continue
        target, unlearned = ((figures.get(key) or {}).get("overall", {}).get("mean")
                             for key in ("target-forget-set", "unlearned-forget-set"))
        after = " | ".join(_fmt(attack_figure(attacks, method, name, "forget-set")) for name in attack_names)
        lines.append(f"| {method} | {_fmt(target)} | {_fmt(unlearned)} | {after} |")
    return "\n".join(lines)


def choice_table(choices: dict[str, dict]) -> str:
    lines = ["| method | loss terms | weights | other settings | step | validation HM12 | validation MIA score | "
             "validation final | retain K | eligible |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, choice in choices.items():
        for row in choice["table"]:
            chosen = all(row.get(key) == choice.get(key) for key in ("loss_terms", "weights", "options", "step"))
            mark = "**" if chosen else ""
            options = ", ".join(f"{name}={value}" for name, value in sorted(row.get("options", {}).items())) or "–"
            lines.append(f"| {mark}{method}{mark} | {'+'.join(row['loss_terms'])} | {json.dumps(row['weights'])} "
                         f"| {options} | {row['step']} | {_fmt(row['hm12'])} "
                         f"| {_fmt(row['mia_score'])} | {mark}{_fmt(row['final'])}{mark} | {_fmt(row['retain_knowledge'])} "
                         f"| {'yes' if row['eligible'] else 'collapsed' if row['collapsed'] else 'no'} |")
    return "\n".join(lines)


def task_table(before: dict, grouped: dict[str, list[dict]]) -> str:
    keys = [f"{split}_{task}_{score}" for split in SPLITS for task in TASKS for score in "RK"]
    names = [f"{split[0].upper()}{task[-1]} {score}" for split in SPLITS for task in TASKS for score in "RK"]
    lines = ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(keys) + 1)]
    lines.append("| target (before) | " + " | ".join(_fmt(before.get(key)) for key in keys) + " |")
    for method, runs in grouped.items():
        finals = [run["curve"][-1] for run in runs]
        lines.append(f"| {method} | " + " | ".join(cell([final[key] for final in finals]) for key in keys) + " |")
    return "\n".join(lines)


def curve_table(before: dict, grouped: dict[str, list[dict]], key: str = "hm12") -> str:
    """`key` at every evaluated step (mean ± sd over the runs evaluated there); runs that kept a step on membership
    are scored at that step only and are left out (`membership_table`)."""
    grouped = {method: runs for method, runs in grouped.items() if "kept_step" not in runs[0]}
    steps = sorted({point["step"] for runs in grouped.values() for run in runs for point in run["curve"]})
    lines = ["| method | step 0 | " + " | ".join(f"step {step}" for step in steps) + " |",
             "|" + "---|" * (len(steps) + 2)]
    for method, runs in grouped.items():
        row = [_fmt(before.get(key))]
        for step in steps:
            row.append(cell([point[key] for run in runs for point in run["curve"] if point["step"] == step]))
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def membership_table(grouped: dict[str, list[dict]]) -> str:
    """For runs that kept a step on membership: the MIA score of the members against the reference documents at
    every scored step (the kept one in bold), and the attack's MIA score at the kept step."""
    lines = []
    for method, runs in grouped.items():
        if "kept_step" not in runs[0]:
            continue
        steps = sorted({point["step"] for run in runs for point in run["membership"]})
        lines += [f"{method}:", "", "| seed | " + " | ".join(f"step {step}" for step in steps)
                  + " | kept | attack MIA score at the kept step |", "|" + "---|" * (len(steps) + 3)]
        for run in runs:
            scores = {point["step"]: point["mia_score"] for point in run["membership"]}
            cells = [(f"**{_fmt(scores[step])}**" if step == run["kept_step"] else _fmt(scores[step]))
                     if step in scores else "n/a" for step in steps]
            lines.append(f"| {run['seed']} | " + " | ".join(cells)
                         + f" | {run['kept_step']} | {_fmt(run['curve'][-1]['mia_score'])} |")
        lines.append("")
    return "\n".join(lines) or "No run kept a step on membership."


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    return f"{value:.2f}"


def qa_rouge_comparison(grouped: dict[str, list[dict]]) -> dict:
    """The paper's QA claim read on our runs: QA ROUGE-L gap (retain minus forget, higher is better) of each method,
    and each GNM variant's relative difference to the mean gap of the non-GNM baselines."""
    gaps = {}
    for method, runs in grouped.items():
        finals = [run["curve"][-1] for run in runs]
        gaps[method] = mean_sd([final["qa_rougeL_retain"] - final["qa_rougeL_forget"] for final in finals
                                if final["qa_rougeL_retain"] is not None and final["qa_rougeL_forget"] is not None])[0]
    baselines = {method: gap for method, gap in gaps.items() if not method.startswith("GNM") and gap is not None}
    baseline = statistics.fmean(baselines.values()) if baselines else None
    best = max(baselines, key=baselines.get) if baselines else None

    def relative_to(reference):
        return {method: (gap - reference) / abs(reference) if reference not in (None, 0) and gap is not None else None
                for method, gap in gaps.items() if method.startswith("GNM")}

    return {"qa_rougeL_gap": gaps, "baseline_mean_gap": baseline, "gnm_relative_to_baselines": relative_to(baseline),
            "best_baseline": best, "gnm_relative_to_best_baseline": relative_to(baselines.get(best))}


def plot_tradeoff(path: str, before: dict, grouped: dict[str, list[dict]]) -> None:
    """Forgetting (mean of 1-R and 1-K on forget) against retention (mean of R and K on retain), one line per
    method through its evaluated steps (mean over the seeds evaluated at each step), the final point with ±1 sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5.5))
    axis.scatter([before["forgetting"]], [before["retention"]], marker="*", s=160, color="black", label="target",
                 zorder=3)
    colours = plt.get_cmap("tab20")  # more methods than the default cycle's 10 colours
    for index, (method, runs) in enumerate(grouped.items()):
        steps = sorted({point["step"] for run in runs for point in run["curve"]})
        xs, ys = [before["forgetting"]], [before["retention"]]
        for step in steps:
            points = [point for run in runs for point in run["curve"] if point["step"] == step]
            xs.append(mean_sd([p["forgetting"] for p in points])[0])
            ys.append(mean_sd([p["retention"] for p in points])[0])
        line = axis.plot(xs, ys, marker="o", markersize=3, label=method, color=colours(index % 20))[0]
        finals = [run["curve"][-1] for run in runs]
        (x, x_sd), (y, y_sd) = mean_sd([f["forgetting"] for f in finals]), mean_sd([f["retention"] for f in finals])
        axis.errorbar([x], [y], xerr=[x_sd], yerr=[y_sd], color=line.get_color(), capsize=3, marker="s")
    axis.set_xlabel("forgetting: mean over tasks of 1−R and 1−K on the forget set →")
    axis.set_ylabel("retention: mean over tasks of R and K on the retain set →")
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    axis.set_title("Forget vs retain trade-off (lines: evaluated steps; squares: final mean ± sd over seeds)",
                   fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)


def write_summary(output: str, before: dict, records: Sequence[dict], attack_records: Sequence[dict],
                  run_info: dict) -> dict:
    """`summary.md`, `summary.json` and `tradeoff.png` in `output`; returns the summary dict. The recommended
    recipe's runs are its own row (`run_info["recommended"]["row"]`)."""
    grouped = by_method(records)
    recommended = run_info["recommended"]["method"]
    attacks = {record["method"]: record["attacks"] for record in attack_records}
    attack_names = run_info["preset_settings"]["attacks"]
    job_seconds = sum(record["wall_seconds"] for record in records if "recorded_by" not in record)  # a job's, once
    run_info = {**run_info, "job_wall_seconds_total": round(job_seconds, 1)}
    at_their_length = {name: runs for name, runs in grouped.items() if "kept_step" not in runs[0]}
    comparison = qa_rouge_comparison(at_their_length)
    summary = {"run": run_info, "before": {k: v for k, v in before.items() if k != "attack_rows"},
               "qa_rouge_comparison": comparison,
               "methods": {method: [run["curve"] for run in runs] for method, runs in grouped.items()},
               "attacks": attacks}
    plot_tradeoff(os.path.join(output, "tradeoff.png"), before, at_their_length)
    report = run_info["target_report"]
    target_lines = "\n".join(f"| {name} | {_fmt(value)} |" for name, value in report.items())
    gaps = "\n".join(f"| {method} | {_fmt(gap)} |" for method, gap in comparison["qa_rougeL_gap"].items())
    negatives = "\n".join(
        f"- {name}: {stats['rows']} rows"
        + (f", {100 * stats['fallback_share']:.0f}% fell back to the perturb backend" if name.startswith("llm") else "")
        + "; "
        f"example {json.dumps(stats['example']['completion'][:80])} -> "
        + " -> ".join(json.dumps(level[:80]) for level in stats["example"]["levels"])
        for name, stats in run_info["negatives"].items()
    )
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run_info["stage_seconds"].items())
    markdown = f"""## Target (before unlearning): mean token NLL

| documents | NLL |
|---|---|
{target_lines}

## Final figures (mean ± sd over seeds {sorted({r['seed'] for r in records})}, at the step chosen on validation)

{main_table(before, grouped, attacks, attack_names)}

## Attacks: forget score (mean of R and K over the forget rows, {run_info['preset_settings']['attack_max_new_tokens']} new tokens; relearn: the held-out half)

{attack_table(grouped, attacks, attack_names)}

## Per task (columns: F/R = forget (↓) / retain (↑) set, 1–3 = task, R = regurgitation, K = knowledge)

{task_table(before, grouped)}

## HM12 across training

{curve_table(before, grouped)}

## MIA score across training

{curve_table(before, grouped, "mia_score")}

## Steps kept on membership (MIA score of the members against the reference documents)

{membership_table(grouped)}

## QA ROUGE-L gap (retain − forget, higher is better)

| method | gap |
|---|---|
{gaps}

## Negatives

{negatives}

## Chosen on validation (weights and steps; the chosen point in bold)

{choice_table(run_info['choices'])}

A point is eligible when it did not collapse and keeps 90% of the target's retain knowledge on validation; each \
method keeps its best eligible point (when it has none: its best point that did not collapse, else its best).

Recommended (the best eligible choice): {recommended} ({'+'.join(run_info['recommended']['loss_terms'])}, \
{json.dumps(run_info['recommended']['weights'])}, {run_info['recommended']['step']} steps), trained on the train rows \
up to {run_info['recommended']['membership_window'][1]:.2f}x the chosen length, keeping the step from \
{run_info['recommended']['membership_window'][0]:.2f}x on whose members the reference documents tell apart the least \
(row {run_info['recommended']['row']!r}).

Command: `{run_info['command']}`; this invocation ran {run_info['jobs_run']} of {run_info['jobs_total']} jobs \
(the others came from cache) in {run_info['wall_seconds']:.0f} s wall ({stages}; {run_info['workers']} worker(s) x \
{run_info['threads_per_worker']} thread(s), {run_info['cpu_count']} cores, GPU: {run_info['gpu'] or 'none'}); \
the comparison jobs' own times add up to {run_info['job_wall_seconds_total']:.0f} s.
"""
    atomic_write_text(os.path.join(output, "summary.md"), markdown)
    atomic_write_json(os.path.join(output, "summary.json"), summary)
    return summary
