"""Every GPU check of issue 14 in one run of under 9 minutes, each figure written as soon as it is measured.

    benchmarks/gpu_proof.sh                           # on the GPU machine (installs .whl/ first when it is there)
    python benchmarks/gpu_proof.py --out OUT          # the same, in an environment that has the packages
    python benchmarks/gpu_proof.py --only speed       # rerun what failed: some of recipes,evaluate,distributed,speed
    python benchmarks/gpu_proof.py --dry-run          # CPU check of the whole run: tiny models, no GPU

The checks, each a script of this folder run as its own process, in this order (the cheapest first, so that a run
cut short loses the least):
1. `recipes` (gpu_recipes.py): the paper's recipe (AdaLoRA all-linear, bf16, batch 1, reference adapter-disabled)
   and the recommended recipe through `gnm unlearn`, bf16 on the GPU against fp32 on the CPU, step by step.
2. `evaluate` (gpu_evaluate.py): `gnm evaluate` on the GPU against the CPU on one partly unlearned model.
3. `distributed` (gpu_distributed.py): `accelerate launch` with fsdp2.yaml and deepspeed_zero3.yaml, one process,
   full model and LoRA, against a plain run; the saved models load back.
4. `speed` (speed.py --preset gpu): (a)-(e), tokens per second, MFU and peak memory; (d) is the speed half of the
   evaluation check.
Each has a time budget (`STAGES`); what one leaves unused passes to the next, and the run stops at the sum. A
stage's process writes its figures as it goes, so a stage cut at its limit keeps what it measured.

Into --out (at most three files, as the GPU machine sends back): gpu_proof.json (every stage's own JSON and how it
ended), gpu_proof.md (the summary, then every stage's own report) and gpu_logs.tar.gz (every command's log), all
rewritten after each stage. The summary is printed at the end; the exit code is 0 when every check passed.
"""

import argparse
import importlib.util
import json
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_paths import HERE, RESULTS  # noqa: E402
from logged_run import run_logged  # noqa: E402


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    script: str
    result: str  # the JSON the script writes into the results folder
    report: str | None  # its markdown report, when it writes one
    seconds: int  # the budget on a GPU machine
    dry_run_seconds: int  # the budget of the CPU dry run (2 slow cores)


STAGES = (
    Stage("recipes", "1. paper and recommended recipes through `gnm unlearn`: bf16 GPU vs fp32 CPU",
          "gpu_recipes.py", "gpu_recipes.json", "gpu_recipes.md", 100, 240),
    Stage("evaluate", "4. `gnm evaluate` on the GPU vs the CPU (scores; its speed is speed's (d))",
          "gpu_evaluate.py", "gpu_evaluate.json", "gpu_evaluate.md", 80, 240),
    Stage("distributed", "2. FSDP2 and ZeRO-3 (one process), full and LoRA, vs a plain run",
          "gpu_distributed.py", "gpu_distributed.json", "gpu_distributed.md", 130, 600),
    Stage("speed", "3. speed.py --preset gpu (a)-(e): ratios, tokens/s, MFU, peak memory",
          "speed.py", "speed.json", None, 200, 300),
)  # fmt: skip
STAGE_NAMES = tuple(stage.name for stage in STAGES)
# A stage whose own budget would end under this is not started (a Python process and a model take that long).
MINIMUM_STAGE_SECONDS = 30
# What the checks import beyond torch; the GPU machines lent here lack most of it (benchmarks/gpu_wheels.sh).
REQUIRED_MODULES = ("transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "rouge_score", "nltk",
                    "gnm_trainer")  # fmt: skip


def missing_modules() -> list[str]:
    """The modules of REQUIRED_MODULES this interpreter cannot import: checked before any GPU time is spent."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def stage_command(stage: Stage, results: str, work: str, seconds: float, dry_run: bool) -> list[str]:
    """The command of `stage`, its results into `results`, its scratch in `work`, given `seconds` in all."""
    command = [sys.executable, os.path.join(HERE, stage.script)]
    if stage.name == "speed":
        return command + ["--preset", "gpu", "--output", os.path.join(results, stage.result)] + (
            ["--tiny"] if dry_run else []
        )
    # These keep their own budget, inside the stage's, so that they stop in time to write what they measured.
    command += ["--out", results, "--budget", str(int(seconds - 10))]
    command += ["--work", os.path.join(work, "workspace" if stage.name != "evaluate" else "evaluate")]
    if stage.name == "distributed":
        command += ["--steps", "3" if dry_run else "20", "--case-timeout", str(int(seconds - 10))]
        command += ["--max-processes", "1"]  # the GPU machines lent here have one GPU
    return command + (["--dry-run"] if dry_run else [])


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# The verdict of each stage, read from its own JSON
# ---------------------------------------------------------------------------------------------------------------


def recipes_verdict(record: dict) -> tuple[bool, str]:
    lines, passed = [], True
    for name, runs in record["recipes"].items():
        comparison = runs.get("comparison") or {"matches": False, "why": "a run did not finish"}
        gpu = runs.get("gpu", {})
        ok = comparison["matches"] and gpu.get("loads_back") == "ok"
        passed &= ok
        largest = max(comparison.get("largest_difference", {}).values(), default=None)
        difference = "-" if largest is None else f"{largest:.2e}"
        why = "" if comparison["matches"] else f"; {comparison.get('first_out_of_tolerance') or comparison.get('why')}"
        lines.append(
            f"{name}: {'pass' if ok else 'FAIL'} (PEFT {gpu.get('peft_type')}, reference {gpu.get('reference_mode')}, "
            f"largest loss difference {difference}, GPU run {gpu.get('wall_seconds')} s{why})"
        )
    return passed, "; ".join(lines)


def evaluate_verdict(record: dict) -> tuple[bool, str]:
    comparison = record.get("comparison")
    if not comparison:
        failed = [name for name, step in record["steps"].items() if step.get("exit_code") != 0]
        return False, f"did not finish ({', '.join(failed) or 'no comparison'})"
    if "largest_score_difference" not in comparison:
        return False, comparison["why"]
    worst = comparison["largest_score_difference"]
    return comparison["agree"], (
        f"scores {'agree' if comparison['agree'] else 'DIFFER'}: largest difference {worst['difference']:.2e} "
        f"({worst['score']}), {comparison['generations_differing']} of {comparison['generations']} generations differ"
    )


def distributed_verdict(record: dict) -> tuple[bool, str]:
    cases = record["cases"]
    failed = [case["name"] for case in cases if not case["result"].get("success")]
    differences = [case["result"].get("max_loss_difference_vs_single_gpu") for case in cases]
    largest = max((value for value in differences if value is not None), default=None)
    return not failed, (
        f"{len(cases) - len(failed)} of {len(cases)} cases finished and load back"
        + (f" (failed or skipped: {', '.join(failed)})" if failed else "")
        + ("" if largest is None else f"; largest loss difference from the plain run {largest:.2e}")
    )


def speed_verdict(record: dict, dry_run: bool = False) -> tuple[bool, str]:
    """Every measurement made and every target met; in a dry run (smoke sizes on a CPU) the targets do not apply."""
    verdicts = record.get("verdicts", {})
    missing = sorted(set("abcde") - set(record.get("figures", {})))
    misses = [name for name, verdict in verdicts.items() if "MISS" in verdict and not verdict.startswith("aim")]
    figures = ", ".join(f"{name} {verdict}" for name, verdict in verdicts.items() if verdict != "(information)")
    figures += f"; not measured: {', '.join(missing)}" if missing else ""
    if dry_run:
        return not missing, figures + " (dry run: smoke sizes on a CPU, the targets do not apply)"
    return not missing and not misses, figures


VERDICTS = {"recipes": recipes_verdict, "evaluate": evaluate_verdict, "distributed": distributed_verdict,
            "speed": speed_verdict}  # fmt: skip


def stage_outcome(stage: Stage, results: str, run: dict, dry_run: bool = False) -> dict:
    """How `stage` ended: its process's exit, the verdict of its own JSON, and that JSON."""
    record = read_json(os.path.join(results, stage.result))
    outcome = {"title": stage.title, "exit_code": run.get("exit_code"), "wall_seconds": run.get("wall_seconds"),
               "record": record}  # fmt: skip
    if record is None:
        outcome.update(passed=False, summary=f"wrote no figures (exit {run.get('exit_code')})")
    else:
        try:
            verdict = VERDICTS[stage.name]
            passed, summary = verdict(record, dry_run) if stage.name == "speed" else verdict(record)
        except (KeyError, TypeError, ValueError) as error:  # a record cut in the middle of a measurement
            passed, summary = False, f"incomplete figures ({type(error).__name__}: {error})"
        outcome.update(passed=passed and run.get("exit_code") == 0, summary=summary)
    if run.get("exit_code") not in (0, None) and "log_tail" in run:
        outcome["log_tail"] = run["log_tail"]
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# What goes back
# ---------------------------------------------------------------------------------------------------------------


def summary_markdown(settings: dict, outcomes: dict) -> str:
    lines = [f"# GPU proof ({settings['device']}, {settings['date']})", "",
             f"Command: `{settings['command']}`; torch {settings['torch']}.", "",
             "| check | passed | wall s | figures |", "| --- | --- | --- | --- |"]  # fmt: skip
    for name in STAGE_NAMES:
        outcome = outcomes.get(name)
        if outcome is None:
            continue
        passed = "yes" if outcome["passed"] else ("skipped" if outcome.get("skipped") else "**no**")
        lines.append(f"| {outcome['title']} | {passed} | {outcome.get('wall_seconds', '-')} | {outcome['summary']} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str, results: str, logs: str, settings: dict, outcomes: dict) -> None:
    from gnm_trainer.io_utils import atomic_path, atomic_write_json, atomic_write_text

    atomic_write_json(os.path.join(out, "gpu_proof.json"), {"settings": settings, "stages": outcomes})
    reports = [summary_markdown(settings, outcomes)]
    for stage in STAGES:
        if stage.name in outcomes:
            path = os.path.join(results, stage.report) if stage.report else None
            if path and os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    reports.append(handle.read())
            elif stage.name == "speed" and (outcomes[stage.name].get("record") or {}).get("table"):
                reports.append("# Speed (benchmarks/speed.py --preset gpu)\n\n" + outcomes["speed"]["record"]["table"])
    atomic_write_text(os.path.join(out, "gpu_proof.md"), "\n".join(reports))
    with atomic_path(os.path.join(out, "gpu_logs.tar.gz")) as temporary, tarfile.open(temporary, "w:gz") as archive:
        for folder in (logs, os.path.join(results, "logs")):
            if os.path.isdir(folder):
                archive.add(folder, arcname=os.path.basename(folder) if folder == logs else "stage_logs")


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(RESULTS, "gpu_proof"))
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--only", default=",".join(STAGE_NAMES), help="stages to run (default all): " +
                        ", ".join(STAGE_NAMES))  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="CPU check: every stage's dry run, tiny models")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    if not chosen or set(chosen) - set(STAGE_NAMES):
        parser.error(f"--only: expected some of {','.join(STAGE_NAMES)}, got {args.only!r}")
    args.stages = [stage for stage in STAGES if stage.name in chosen]
    return args


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU found: run on a GPU machine, or pass --dry-run for a CPU check", file=sys.stderr)
        return 2
    missing = missing_modules()
    if missing:
        print(f"missing Python packages: {', '.join(missing)}. On a machine without a package index, build them "
              "where PyPI is reachable with benchmarks/gpu_wheels.sh and bring .whl/ (gpu_proof.sh installs it); "
              "gnm_trainer itself runs from the checkout (PYTHONPATH)", file=sys.stderr)  # fmt: skip
        return 2
    started = time.perf_counter()
    work = args.work or tempfile.mkdtemp(prefix="gnm-gpu-proof-")
    results, logs = os.path.join(work, "results"), os.path.join(work, "logs")
    os.makedirs(args.out, exist_ok=True)
    settings = {
        "device": "CPU dry run" if args.dry_run else torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "command": "python benchmarks/gpu_proof.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget_seconds": {stage.name: stage.dry_run_seconds if args.dry_run else stage.seconds
                           for stage in args.stages},
    }  # fmt: skip
    outcomes, deadline = {}, started
    for stage in args.stages:
        deadline += settings["budget_seconds"][stage.name]  # what earlier stages left unused passes on
        seconds = deadline - time.perf_counter()
        if seconds < MINIMUM_STAGE_SECONDS:
            outcomes[stage.name] = {"title": stage.title, "passed": False, "skipped": True,
                                    "summary": f"skipped: {seconds:.0f} s left of the run's budget"}  # fmt: skip
        else:
            command = stage_command(stage, results, work, seconds, args.dry_run)
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
            run = run_logged(command, os.path.join(logs, f"{stage.name}.log"), env, seconds)
            outcomes[stage.name] = stage_outcome(stage, results, run, args.dry_run)
        print(f"[{stage.name}] {'passed' if outcomes[stage.name]['passed'] else 'NOT passed'}: "
              f"{outcomes[stage.name]['summary']}", flush=True)  # fmt: skip
        write_outputs(args.out, results, logs, settings, outcomes)
    settings["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(args.out, results, logs, settings, outcomes)
    print(summary_markdown(settings, outcomes))
    return 0 if all(outcome["passed"] for outcome in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
