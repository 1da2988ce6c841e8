"""`gnm evaluate` batched on a GPU against the same command on the CPU, on the same partly unlearned model.

    python benchmarks/gpu_evaluate.py --out OUT                   # on a GPU machine (about a minute)
    python benchmarks/gpu_evaluate.py --out OUT --target DIR      # a `gnm make-target` folder already made
    python benchmarks/gpu_evaluate.py --out OUT --dry-run         # CPU check: both runs on the CPU, other batches

The model is the embedded default's target (`gnm make-target`: a tiny Llama that memorised the synthetic LUME set;
made here unless --target names one) with a LoRA adapter from 12 steps of ga+gd at lr 2e-2 on the CPU
(`PARTLY_UNLEARNED`): its scores sit between 0 and 1 and its generations half break down, where a difference
between devices would show (a memorised target scores 1.0 everywhere on both). Then `gnm evaluate` on it twice,
float32 and batch 16 as the command defaults to: on the GPU, and on the CPU (`CUDA_VISIBLE_DEVICES=""`). Every
official score must agree within `SCORE_TOLERANCE`, the members' and non-members' mean NLL within `NLL_TOLERANCE`
(relative); the report counts the generations that differ. The speed of `gnm evaluate` against the organisers'
loop on a GPU is measurement (d) of benchmarks/speed.py.

Writes <out>/gpu_evaluate.json and <out>/gpu_evaluate.md after every step, each command's log to <out>/logs/.
`--dry-run` runs the "GPU" evaluation on the CPU with batch 4 (the CPU run keeps 16): the comparison is checked,
and with it that a float32 evaluation does not depend on its batch size.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_paths import RESULTS  # noqa: E402
from logged_run import run_logged  # noqa: E402

GNM = [sys.executable, "-m", "gnm_trainer.cli"]
PARTLY_UNLEARNED = ["--loss_terms", "ga", "gd", "--max_steps", "12", "--learning_rate", "2e-2", "--use_peft",
                    "--lora_target_modules", "all-linear", "--per_device_train_batch_size", "8", "--seed", "0",
                    "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
SCORE_TOLERANCE = 0.01  # absolute, on every score in [0, 1] of evaluation_results.json
NLL_TOLERANCE = 1e-3  # relative, on the MIA mean document NLL
EVALUATION_BATCH = {"gpu": 16, "cpu": 16, "gpu (dry run)": 4}


def cpu_only(env: dict) -> dict:
    return {**env, "CUDA_VISIBLE_DEVICES": ""}


def compare_evaluations(gpu_dir: str, cpu_dir: str) -> dict:
    """The two evaluations side by side: the largest score difference, the NLL differences, the generations that
    differ and whether they agree within the tolerances. Scores are every number of evaluation_results.json by its
    path ("forget-set/Task1/knowledge-score"), the settings left out (the batch sizes may differ)."""
    from gnm_trainer.evaluation import flatten_results

    runs = {}
    for name, folder in (("gpu", gpu_dir), ("cpu", cpu_dir)):
        with open(os.path.join(folder, "evaluation_results.json"), encoding="utf-8") as handle:
            results = json.load(handle)
        with open(os.path.join(folder, "per_example.jsonl"), encoding="utf-8") as handle:
            generations = {row["id"] + row["split"]: row["generation"] for row in map(json.loads, handle)}
        runs[name] = (flatten_results({key: value for key, value in results.items() if key != "settings"}), generations)
    (gpu_scores, gpu_generations), (cpu_scores, cpu_generations) = runs["gpu"], runs["cpu"]
    nll = {key: value for key, value in cpu_scores.items() if key.startswith("mia_mean_nll/")}
    score_keys = sorted(set(cpu_scores) - set(nll))
    if set(gpu_scores) != set(cpu_scores) or set(gpu_generations) != set(cpu_generations):
        return {"agree": False, "why": "the two evaluations hold different scores or rows"}
    score_differences = {key: abs(gpu_scores[key] - cpu_scores[key]) for key in score_keys}
    nll_differences = {key: abs(gpu_scores[key] - value) / max(abs(value), 1e-12) for key, value in nll.items()}
    worst = max(score_differences, key=score_differences.get)
    differing = sorted(key for key, text in cpu_generations.items() if gpu_generations[key] != text)
    agree = all(math.isfinite(value) and value <= SCORE_TOLERANCE for value in score_differences.values()) and all(
        value <= NLL_TOLERANCE for value in nll_differences.values()
    )
    return {
        "agree": agree,
        "largest_score_difference": {"score": worst, "difference": score_differences[worst],
                                     "gpu": gpu_scores[worst], "cpu": cpu_scores[worst]},
        "mean_nll_relative_difference": nll_differences,
        "generations_differing": len(differing), "generations": len(cpu_generations),
        "first_differing_rows": differing[:5],
        "scores": {key: {"gpu": gpu_scores[key], "cpu": cpu_scores[key]} for key in score_keys},
    }  # fmt: skip


def markdown(record: dict) -> str:
    lines = [f"# `gnm evaluate`: {record['settings']['device']} against the CPU", "",
             "| step | ok | wall s |", "| --- | --- | --- |"]  # fmt: skip
    for name, step in record["steps"].items():
        ok = "yes" if step.get("exit_code") == 0 else f"**no** ({step.get('exit_code', 'not run')})"
        lines.append(f"| {name} | {ok} | {step.get('wall_seconds', '-')} |")
    comparison = record.get("comparison")
    if comparison:
        lines += ["", f"Agree within {SCORE_TOLERANCE} on every score and {NLL_TOLERANCE:g} (relative) on the mean "
                  f"NLLs: **{'yes' if comparison['agree'] else 'no'}**."]  # fmt: skip
        if "largest_score_difference" in comparison:
            worst = comparison["largest_score_difference"]
            nll = ", ".join(f"{k} {v:.1e}" for k, v in comparison["mean_nll_relative_difference"].items())
            lines += [f"Largest score difference: {worst['score']} {worst['difference']:.2e} (GPU {worst['gpu']:.4f}, "
                      f"CPU {worst['cpu']:.4f}); generations that differ: {comparison['generations_differing']} of "
                      f"{comparison['generations']}; mean NLL relative differences: {nll}."]  # fmt: skip
        else:
            lines.append(comparison["why"])
    return "\n".join(lines) + "\n"


def write_record(record: dict, out: str) -> None:
    from gnm_trainer.io_utils import atomic_write_json, atomic_write_text

    atomic_write_json(os.path.join(out, "gpu_evaluate.json"), record)
    atomic_write_text(os.path.join(out, "gpu_evaluate.md"), markdown(record))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or RESULTS)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--target", default=None, help="a `gnm make-target` folder (default: make one in --work)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for all steps; later ones are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU check: both evaluations on the CPU")
    args = parser.parse_args(argv)

    import torch

    started = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU found: run on a GPU machine, or pass --dry-run for a CPU check", file=sys.stderr)
        return 2
    work = args.work or tempfile.mkdtemp(prefix="gnm-gpu-evaluate-")
    os.makedirs(args.out, exist_ok=True)
    gpu_name = "gpu (dry run)" if args.dry_run else "gpu"
    target = args.target or os.path.join(work, "memorised-target")
    adapter = os.path.join(work, "partly-unlearned")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    evaluations = {device: os.path.join(work, f"evaluation-{device}") for device in ("gpu", "cpu")}
    for scratch in (adapter, *evaluations.values()):  # an earlier invocation's, with the same --work
        shutil.rmtree(scratch, ignore_errors=True)

    def evaluate(device: str) -> list[str]:
        batch = EVALUATION_BATCH[gpu_name if device == "gpu" else "cpu"]
        return GNM + ["evaluate", "--model", adapter, "--data", os.path.join(target, "data"), "--mia_data",
                      os.path.join(target, "data", "mia"), "--batch_size", str(batch), "--no_progress",
                      "--output_dir", evaluations[device]]  # fmt: skip

    make_target = GNM + ["make-target", "--output_dir", target, "--quiet"]
    plan = [] if args.target else [("make target", make_target, env)]  # else a `gnm make-target` folder was given
    plan += [
        ("unlearn 12 steps (CPU)", GNM + ["unlearn", "--model_name_or_path", target, "--data_dir",
                                          os.path.join(target, "data"), "--output_dir", adapter] + PARTLY_UNLEARNED,
         cpu_only(env)),
        (f"evaluate on the {gpu_name}", evaluate("gpu"), cpu_only(env) if args.dry_run else env),
        ("evaluate on the CPU", evaluate("cpu"), cpu_only(env)),
    ]  # fmt: skip
    device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    record = {"settings": {"device": device, "target": target, "torch": torch.__version__}, "steps": {}}
    for name, command, step_env in plan:
        left = args.budget - (time.perf_counter() - started)
        if left < 10:
            record["steps"][name] = {"exit_code": "skipped (time budget)"}
            continue
        log_path = os.path.join(args.out, "logs", "evaluate-" + name.split(" (")[0].replace(" ", "-") + ".log")
        step = {"command": " ".join(command[2:]), **run_logged(command, log_path, step_env, left)}
        record["steps"][name] = step
        print(f"{name}: exit {step['exit_code']} in {step['wall_seconds']}s", flush=True)
        write_record(record, args.out)
        if step["exit_code"] != 0:
            break
    if all(os.path.exists(os.path.join(folder, "evaluation_results.json")) for folder in evaluations.values()):
        record["comparison"] = compare_evaluations(evaluations["gpu"], evaluations["cpu"])
    write_record(record, args.out)
    print(markdown(record))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if record.get("comparison", {}).get("agree") else 1


if __name__ == "__main__":
    sys.exit(main())
