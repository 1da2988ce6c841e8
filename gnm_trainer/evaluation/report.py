"""A readable report of one or two evaluations: `report.md` (tables) and `plot.png` (grouped bars).

With two results ("before" and "after" unlearning) every value is shown side by side; with one, a single column.
"""

import os
from collections.abc import Mapping
from typing import Any

from ..io_utils import atomic_path, atomic_write_text
from .semeval import KNOWLEDGE, REGURGITATION, SPLITS

REPORT_FILE = "report.md"
PLOT_FILE = "plot.png"
ATTACKS_PLOT_FILE = "attacks.png"
ATTACKS_KEY = "attacks"  # attacks.RESULTS_KEY (not imported: the attacks module loads the data stack)
OVERALL, MEAN = "overall", "mean"
SUMMARY_KEYS = (
    ("harmonic-mean-task-aggregate", "task aggregate (HM12)"),
    ("mia_loss_acc", "MIA AUC (0.5 is ideal)"),
    ("mia_final_score", "MIA score"),
    ("mmlu_average", "MMLU"),
    ("aggregate-score", "final score"),
)


def _tasks(*results: Mapping[str, Any] | None) -> list[str]:
    names = set()
    for result in results:
        for split in SPLITS:
            for key, value in (result or {}).get(f"{split}-set", {}).items():
                if isinstance(value, Mapping):
                    names.add(key)
    return sorted(names)


def _value(results: Mapping[str, Any] | None, split: str, task: str, metric: str) -> float | None:
    return ((results or {}).get(f"{split}-set", {}).get(task) or {}).get(metric)


def _format(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_report(
    before_results: Mapping[str, Any], after_results: Mapping[str, Any] | None = None, title: str = "Evaluation"
) -> str:
    """The text of `report.md`: per split and task R and K, then the summary scores and the notes."""
    columns = [("before", before_results), ("after", after_results)] if after_results else [("value", before_results)]
    lines = [f"# {title}", "", "SemEval-2025 Task 4 metric: R = regurgitation (ROUGE-L recall, sentence completion), "
             "K = knowledge (exact match, QA). Lower is better on the forget set, higher on the retain set.", ""]
    metric_headers = [f"{short} {name}" for short in ("R", "K") for name, _ in columns]
    lines += ["| split | task | " + " | ".join(metric_headers) + " |", "|---|---|" + "---:|" * len(metric_headers)]
    for split in SPLITS:
        for task in _tasks(*(r for _, r in columns)):
            cells = [_format(_value(r, split, task, metric)) for metric in (REGURGITATION, KNOWLEDGE) for _, r in columns]
            if any(cell != "–" for cell in cells):
                lines.append(f"| {split} | {task} | " + " | ".join(cells) + " |")
    lines += ["", "| score | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for key, label in SUMMARY_KEYS:
        lines.append(f"| {label} | " + " | ".join(_format(r.get(key)) for _, r in columns) + " |")
    for name, result in columns:
        terms = result.get("aggregate-score-terms")
        notes = result.get("notes") or []
        settings = settings_line(result.get("settings"))
        if terms or notes or settings:
            lines += ["", f"Notes ({name}):"]
            if settings:
                lines.append(f"- {settings}")
            if terms:
                lines.append(f"- final score = mean of {', '.join(terms)}")
            lines += [f"- {note}" for note in notes]
    attacks = (after_results or before_results).get(ATTACKS_KEY)
    if attacks:
        lines += ["", *attacks_section(attacks)]
    return "\n".join(lines) + "\n"


def _attack_rows(attacks: Mapping[str, Any]) -> list[tuple[str, str, Mapping | None, Mapping | None]]:
    """(label, rows scored, forget scores, recovery) for the target, the unlearned model and each attack."""
    rows = [("target (no attack)", "all", attacks.get("target-forget-set"), None),
            ("unlearned (no attack)", "all", attacks.get("unlearned-forget-set"), None)]
    for name in attacks.get("settings", {}).get("attacks", []):
        figures = attacks[name]
        if "held_out_rows" in figures:
            held_out = f"held-out half ({figures['held_out_rows']})"
            rows += [("target, held-out half", held_out, figures.get("target-forget-set"), None),
                     ("unlearned, held-out half", held_out, figures.get("unlearned-forget-set"), None)]
        scope = f"held-out half ({figures['held_out_rows']})" if "held_out_rows" in figures else "all"
        rows.append((name, scope, figures.get("forget-set"), figures.get("recovery")))
    return rows


def attacks_section(attacks: Mapping[str, Any]) -> list[str]:
    """Markdown lines: forget scores and recovery per attack (overall, then per task), the settings and notes."""
    metrics = (REGURGITATION, KNOWLEDGE, MEAN)
    lines = ["## Attacks: does the forgotten come back?", "",
             "Forget-set scores (lower = more forgotten) after each attack, and the recovery of what unlearning "
             "removed: (attacked - unlearned) / (target - unlearned); 0 = nothing came back, 1 = everything the "
             "unlearning removed came back. `relearn` fine-tunes on half of the forget documents and scores the "
             "other (held-out) half, so its figures compare with the target's and the unlearned model's on that half.",
             "", "| model | forget rows | R | K | mean | R recovery | K recovery | mean recovery |",
             "|---|---|" + "---:|" * 6]
    for label, scope, scores, recovered in _attack_rows(attacks):
        overall = (scores or {}).get(OVERALL, {})
        cells = [_format(overall.get(m)) for m in metrics]
        cells += [_format((recovered or {}).get(OVERALL, {}).get(m)) if recovered else "" for m in metrics]
        lines.append(f"| {label} | {scope} | " + " | ".join(cells) + " |")
    per_task = [(name, task, values) for name in attacks.get("settings", {}).get("attacks", [])
                for task, values in (attacks[name].get("recovery") or {}).items() if task != OVERALL]
    if per_task:
        lines += ["", "| attack | task | R recovery | K recovery | mean recovery |", "|---|---|" + "---:|" * 3]
        lines += [f"| {name} | {task} | " + " | ".join(_format(values.get(m)) for m in metrics) + " |"
                  for name, task, values in per_task]
    settings = attacks.get("settings", {})
    lines += ["", f"Attack settings: seed {settings.get('seed')}, relearn {settings.get('relearn_steps')} steps at "
              f"learning rate {settings.get('relearn_learning_rate')}, LoRA rank {settings.get('relearn_lora_r')} "
              "(0 = full fine-tuning); quantisation with bitsandbytes (8-bit LLM.int8, 4-bit NF4)."]
    notes = [f"{name}: {note}" for name in settings.get("attacks", []) for note in attacks[name].get("notes") or []]
    lines += [f"- {note}" for note in notes]
    return lines


def attack_summary_line(attacks: Mapping[str, Any]) -> str:
    """One line: each attack's overall mean recovery (or its overall forget score without a target)."""
    parts = []
    for name in attacks.get("settings", {}).get("attacks", []):
        figures = attacks[name]
        if figures.get("recovery"):
            parts.append(f"{name}_recovery={_format(figures['recovery'][OVERALL][MEAN])}")
        else:
            parts.append(f"{name}_forget_mean={_format(figures['forget-set'][OVERALL][MEAN])}")
    return "attacks: " + " ".join(parts)


def plot_attacks(path: str, attacks: Mapping[str, Any], title: str = "Attacks") -> None:
    """Bars of the overall forget score (R and K panels): target, unlearned, each attack (relearn's on its half)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _attack_rows(attacks)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = ["#4f81bd" if label.startswith("target") else "#9bbb59" if label.startswith("unlearned") else "#c0504d"
               for label, *_ in rows]
    for axis, (metric, label) in zip(axes, ((REGURGITATION, "forget R (ROUGE-L recall)"),
                                            (KNOWLEDGE, "forget K (exact match)"))):
        values = [((scores or {}).get(OVERALL, {}).get(metric) or 0.0) for _, _, scores, _ in rows]
        axis.bar(range(len(rows)), values, color=colours)
        axis.set_xticks(range(len(rows)), [name.replace(", ", "\n") for name, *_ in rows], fontsize="small",
                        rotation=30, ha="right")
        axis.set_ylim(0, 1.05)
        axis.set_title(label)
    axes[0].set_ylabel("score (lower = more forgotten)")
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)


def settings_line(settings: Mapping[str, Any] | None) -> str:
    """How the generations were made (dtype, batch size, prompt format), next to the organisers' way; "" if unknown."""
    if not settings or "dtype" not in settings:
        return ""
    prompt = settings.get("prompt_format") or "{prompt}"
    return (f"evaluated in {settings['dtype']}, batch size {settings.get('batch_size', '?')}, prompts as `{prompt}`"
            " (the leaderboard: bfloat16, one example at a time, raw prompts `{prompt}`)")


def plot_results(path: str, before_results: Mapping[str, Any], after_results: Mapping[str, Any] | None = None,
                 title: str = "Evaluation") -> None:
    """Grouped bars per task: forget vs retain, before vs after, one panel for R and one for K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("before", before_results), ("after", after_results)] if after_results else [("", before_results)]
    tasks = _tasks(*(r for _, r in runs))
    bars = [(split, name, results) for split in SPLITS for name, results in runs]
    colours = {"forget": "#c0504d", "retain": "#4f81bd"}
    width = 0.8 / len(bars)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, (metric, label) in zip(axes, ((REGURGITATION, "R (ROUGE-L recall)"), (KNOWLEDGE, "K (exact match)"))):
        for offset, (split, name, results) in enumerate(bars):
            values = [_value(results, split, task, metric) or 0.0 for task in tasks]
            positions = [i + (offset - (len(bars) - 1) / 2) * width for i in range(len(tasks))]
            axis.bar(positions, values, width, color=colours[split], alpha=0.45 if name == "before" else 0.95,
                     hatch="//" if name == "before" else None, label=f"{split} {name}".strip())
        axis.set_xticks(range(len(tasks)), tasks)
        axis.set_ylim(0, 1.05)
        axis.set_title(label)
    axes[0].set_ylabel("score")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize="small", frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the bars, which it must not hide
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)


def write_report(
    output_dir: str,
    before_results: Mapping[str, Any],
    after_results: Mapping[str, Any] | None = None,
    title: str = "SemEval-2025 Task 4 evaluation",
) -> tuple[str, str]:
    """Write `report.md` and `plot.png` into `output_dir` (atomically), and `attacks.png` when the results hold
    attack figures; returns the paths of the report and the main plot."""
    report_path, plot_path = os.path.join(output_dir, REPORT_FILE), os.path.join(output_dir, PLOT_FILE)
    atomic_write_text(report_path, markdown_report(before_results, after_results, title))
    plot_results(plot_path, before_results, after_results, title)
    attacks = (after_results or before_results).get(ATTACKS_KEY)
    if attacks:
        plot_attacks(os.path.join(output_dir, ATTACKS_PLOT_FILE), attacks, title=f"{title}: attacks")
    return report_path, plot_path
