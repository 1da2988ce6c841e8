"""The paper's recipe and the recommended recipe through `gnm unlearn` on a GPU, against the same steps on the CPU.

    python benchmarks/gpu_recipes.py --out OUT              # on a GPU machine (about 2 minutes on one H100)
    python benchmarks/gpu_recipes.py --out OUT --dry-run    # CPU plumbing check: tiny model, bf16 run on the CPU

Each recipe file of `recipes/olmo-1b/semeval25` (the paper's `config_gnm_adalora.yaml`: AdaLoRA on all linear
layers, bf16, batch 1, ga+klr+gnm with the reference adapter-disabled; `config_recommended.yaml`: LoRA r 16,
simnpo+klb+gd+gnm on whole documents, the step kept on membership) runs twice through the real CLI, with only what
ties it to OLMo and to 800 steps changed (`recipe_file`): once as written, bf16 on the GPU, and once in fp32 on the
CPU (`CUDA_VISIBLE_DEVICES=""`, `--dtype float32 --bf16 false`). Same seed, same rows, same order: the two runs
see the same batches, so their per-step loss terms (logging_steps 1) must agree within bf16's tolerance
(`BF16_TOLERANCE`). The model is the ~100M-parameter Llama of benchmarks/gpu_distributed.py, built from a config on
the package's synthetic LUME set (random weights: the check is the arithmetic, not unlearning quality); the
recommended recipe's base model (`klb`) is the target itself, its membership members the synthetic set's, its
reference synthetic documents drawn apart from them.

Writes <out>/gpu_recipes.json and <out>/gpu_recipes.md after every run (a run cut short keeps what it measured),
each run's log to <out>/logs/. `--dry-run` runs the same four runs on a tiny model, the "GPU" run in bf16 on the CPU
(the same precision settings, autocast on the CPU), so that the comparison is checked where no GPU is.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_paths import REPO, RESULTS  # noqa: E402
from gpu_distributed import build_workspace, load_back  # noqa: E402
from logged_run import run_logged  # noqa: E402

RECIPE_DIR = os.path.join(REPO, "recipes", "olmo-1b", "semeval25")
RECIPES = {"paper": "config_gnm_adalora.yaml", "recommended": "config_recommended.yaml"}
# A loss term of the bf16 GPU run matches the fp32 CPU run at a step when |gpu - cpu| <= absolute + relative * |cpu|.
# bf16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); a forward through a dozen layers and a few dozen
# optimizer steps on bf16 weights add up to about 1% on an NLL of ~9 nats, KL terms start at 0.
BF16_TOLERANCE = {"absolute": 0.05, "relative": 0.03}
# What the fp32 CPU run changes in a recipe (the rest of the recipe stays as written).
FP32_CPU_FLAGS = ["--dtype", "float32", "--bf16", "false"]


def reference_documents_file(work: str, count: int = 40) -> str:
    """Synthetic documents of the data's kinds that the target never read, drawn apart from its MIA non-members
    (`make_reference_documents`): the membership reference, which `gnm unlearn` refuses to be the non-members."""
    from gnm_trainer.data.synthetic import make_reference_documents

    path = os.path.join(work, "reference.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"document": text}) + "\n" for text in make_reference_documents(0, count))
    return path


def recipe_file(name: str, work: str, steps: int) -> str:
    """Recipe `name` with the model, data, base model, membership documents and length of this benchmark: a YAML
    in `work` that `gnm unlearn --config` reads. Everything else (PEFT, precision, batch, loss, optimizer) is the
    recipe's own."""
    with open(os.path.join(RECIPE_DIR, RECIPES[name]), encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    recipe.pop("dataset_name")
    recipe.update(
        model_name_or_path=os.path.join(work, "target"), data_dir=os.path.join(work, "data"),
        negatives_path=os.path.join(work, "negatives.jsonl"), max_steps=steps, logging_steps=1, save_strategy="no",
    )  # fmt: skip
    if "base_model" in recipe:
        recipe["base_model"] = os.path.join(work, "target")
    if "keep_best_membership_steps" in recipe:
        every = max(1, steps // 3)
        recipe.update(
            keep_best_membership_steps=every, membership_start_step=every,
            membership_members=os.path.join(work, "data", "mia", "member.jsonl"),
            membership_reference=reference_documents_file(work),
        )  # fmt: skip
    path = os.path.join(work, "recipes", RECIPES[name])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(recipe, handle, sort_keys=False)
    return path


def unlearn_command(config: str, output_dir: str, device: str, dry_run: bool) -> list[str]:
    command = [sys.executable, "-m", "gnm_trainer.cli", "unlearn", "--config", config, "--output_dir", output_dir]
    if device == "cpu":
        return command + FP32_CPU_FLAGS
    return command + (["--use_cpu", "true"] if dry_run else [])  # the recipe's bf16, autocast on the CPU


def run_recipe(name: str, device: str, work: str, steps: int, dry_run: bool, timeout: float, out: str) -> dict:
    """One `gnm unlearn` run of recipe `name`: "gpu" as written (on the CPU in a dry run), "cpu" in fp32."""
    output_dir = os.path.join(work, "runs", f"{name}-{device}")
    shutil.rmtree(output_dir, ignore_errors=True)  # scratch of an earlier invocation with the same --work
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if device == "cpu" or dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = unlearn_command(recipe_file(name, work, steps), output_dir, device, dry_run)
    log_path = os.path.join(out, "logs", f"recipe-{name}-{device}.log")
    result = {"command": " ".join(command[1:]), **run_logged(command, log_path, env, timeout)}
    if result["exit_code"] != 0:
        return result
    return {**result, **read_unlearn_run(output_dir, work)}


def read_unlearn_run(output_dir: str, work: str) -> dict:
    """The per-step loss terms, the training time, what the manifest says and whether the adapter loads back."""
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    with open(os.path.join(output_dir, "gnm_manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    steps = [{key: value for key, value in entry.items() if key.startswith("loss")} for entry in history
             if "loss" in entry]  # fmt: skip
    runtime = next((entry["train_runtime"] for entry in history if "train_runtime" in entry), None)
    return {
        "steps": steps,
        "train_runtime_seconds": runtime,
        "reference_mode": manifest.get("reference_mode"),
        "peft_type": (manifest.get("peft") or {}).get("type"),
        "kept_step": (manifest.get("best_on_membership") or {}).get("step"),
        "loads_back": load_back(output_dir, work, peft=True),
    }


def compare_losses(gpu_steps: list[dict], cpu_steps: list[dict], tolerance: dict = BF16_TOLERANCE) -> dict:
    """Every loss term of every step of the two runs side by side: the largest difference per term, the first
    step and term out of tolerance (None when all match) and whether they match."""
    largest, first_miss = {}, None
    if len(gpu_steps) != len(cpu_steps) or not cpu_steps:
        return {"matches": False, "why": f"{len(gpu_steps)} logged steps against {len(cpu_steps)}"}
    for step, (gpu, cpu) in enumerate(zip(gpu_steps, cpu_steps), start=1):
        if set(gpu) != set(cpu):
            return {"matches": False, "why": f"step {step}: terms {sorted(gpu)} against {sorted(cpu)}"}
        for term, reference in cpu.items():
            difference = abs(gpu[term] - reference)
            if not math.isfinite(difference):
                difference = math.inf
            largest[term] = max(largest.get(term, 0.0), difference)
            if first_miss is None and difference > tolerance["absolute"] + tolerance["relative"] * abs(reference):
                first_miss = {"step": step, "term": term, "gpu": gpu[term], "cpu": reference}
    return {"matches": first_miss is None, "largest_difference": largest, "first_out_of_tolerance": first_miss}


def markdown(results: dict, workspace: dict, settings: dict) -> str:
    lines = [
        f"# Recipes through `gnm unlearn`: {settings['device']} against fp32 on the CPU",
        "",
        f"Llama built from a config: {workspace.get('parameters', 0) / 1e6:.1f}M parameters; {settings['steps']} "
        f"steps, logging every step; tolerance |gpu - cpu| <= {BF16_TOLERANCE['absolute']} + "
        f"{BF16_TOLERANCE['relative']} x |cpu| per loss term and step.",
        "",
        "| recipe | run | ok | wall s | train s | PEFT | reference | kept step | loads back | step-1 loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        for device in ("gpu", "cpu"):
            run = runs.get(device, {})
            first = run.get("steps", [{}])[0].get("loss") if run.get("steps") else None
            ok = "yes" if run.get("exit_code") == 0 else f"**no** ({run.get('exit_code', 'not run')})"
            first = "-" if first is None else f"{first:.4f}"
            keys = ("wall_seconds", "train_runtime_seconds", "peft_type", "reference_mode", "kept_step", "loads_back")
            cells = [name, settings["run_names"][device], ok, *(run.get(key, "-") for key in keys), first]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += ["", "| recipe | loss terms match | largest difference per term | first out of tolerance |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for name, runs in results.items():
        comparison = runs.get("comparison")
        if comparison is None:
            continue
        largest = ", ".join(f"{term} {value:.2e}" for term, value in comparison.get("largest_difference", {}).items())
        lines.append(f"| {name} | {'yes' if comparison['matches'] else '**no**'} | {largest or comparison.get('why')} "
                     f"| {comparison.get('first_out_of_tolerance') or '-'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_results(results: dict, workspace: dict, settings: dict, out: str) -> None:
    from gnm_trainer.io_utils import atomic_write_json, atomic_write_text

    payload = {"settings": settings, "tolerance": BF16_TOLERANCE, "model": workspace, "recipes": results}
    atomic_write_json(os.path.join(out, "gpu_recipes.json"), payload)
    atomic_write_text(os.path.join(out, "gpu_recipes.md"), markdown(results, workspace, settings))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or RESULTS)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temp folder); a workspace of "
                        "benchmarks/gpu_distributed.py already there is reused")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; dry run 4)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, of: " + ", ".join(RECIPES))
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for all runs; later ones are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check: tiny model, bf16 on the CPU")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.recipes.split(",") if name.strip()]
    if not names or set(names) - set(RECIPES):
        parser.error(f"--recipes: expected some of {', '.join(RECIPES)}, got {args.recipes!r}")

    import torch

    started = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU found: run on a GPU machine, or pass --dry-run for a CPU plumbing check", file=sys.stderr)
        return 2
    steps = args.steps or (4 if args.dry_run else 30)
    work = args.work or tempfile.mkdtemp(prefix="gnm-gpu-recipes-")
    os.makedirs(args.out, exist_ok=True)
    device = "bf16 on the CPU (dry run)" if args.dry_run else f"bf16 on {torch.cuda.get_device_name(0)}"
    settings = {"device": device, "steps": steps, "dry_run": args.dry_run, "torch": torch.__version__,
                "run_names": {"gpu": device, "cpu": "fp32 on the CPU"}}  # fmt: skip
    workspace = build_workspace(work, "tiny" if args.dry_run else "100m")
    results = {}
    for name in names:
        results[name] = {}
        for run_device in ("gpu", "cpu"):
            left = args.budget - (time.perf_counter() - started)
            if left < 20:
                results[name][run_device] = {"exit_code": "skipped (time budget)"}
                continue
            run = run_recipe(name, run_device, work, steps, args.dry_run, left, args.out)
            results[name][run_device] = run
            print(f"{name} {run_device}: exit {run['exit_code']} in {run['wall_seconds']}s", flush=True)
            write_results(results, workspace, settings, args.out)
        gpu, cpu = results[name]["gpu"], results[name]["cpu"]
        if gpu.get("steps") and cpu.get("steps"):
            results[name]["comparison"] = compare_losses(gpu["steps"], cpu["steps"])
        write_results(results, workspace, settings, args.out)
    print(markdown(results, workspace, settings))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    passed = all(runs.get("comparison", {}).get("matches") and runs["gpu"].get("loads_back") == "ok"
                 for runs in results.values())  # fmt: skip
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
