"""FSDP2 and DeepSpeed ZeRO-3 unlearning runs against one plain GPU process, on a ~100M-parameter Llama.

Run by `benchmarks/gpu_distributed.sh` (see there). Nothing is downloaded: the data is the package's synthetic LUME
set, the tokenizer is trained on it, the model is a Llama built from a config (random weights: the benchmark measures
the distributed machinery, not unlearning quality), the negatives come from the perturb backend.

Each case is one `accelerate launch` of `benchmarks/distributed_worker.py` with one of the repo's accelerate configs
(the recipe `ga, klr, gnm`, the same effective batch everywhere), with and without LoRA:
- `single_gpu`: one plain process, the baseline;
- `fsdp2`, `deepspeed_zero3`: one process, and as many as the GPUs allow (a power of two up to 8).
For every case it records: success, wall time, per-step losses and their largest difference from the baseline
(bf16 autocast, so expect ~1e-2, not fp32's 1e-5), peak GPU memory per process, how much of the trained and of the
reference model each process holds, and whether the saved result loads back with from_pretrained / PeftModel.
Results are written after every case to <out>/gpu_distributed.json and <out>/gpu_distributed.md, each case's
launcher log to <out>/logs/; models and runs stay in a scratch folder (--work).

`--dry-run` checks the plumbing on a CPU-only machine: a tiny model, 3 steps, 2 CPU processes, no mixed precision
(FSDP falls back to plain data parallel there; ZeRO-3 really runs).
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_paths import REPO, RESULTS  # noqa: E402
from logged_run import run_logged  # noqa: E402

CONFIGS = os.path.join(REPO, "accelerate_configs")
WORKER = os.path.join(REPO, "benchmarks", "distributed_worker.py")
EFFECTIVE_BATCH = 8
SIZES = {  # build_tiny_llama arguments and tokenizer vocabulary
    "100m": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2048, "vocab_size": 8192},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 512},
}
LORA_FLAGS = ["--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0",
              "--lora_target_modules", "all-linear"]  # fmt: skip


@dataclass
class Case:
    config: str
    processes: int
    peft: bool
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.config}-{self.processes}p-{'lora' if self.peft else 'full'}"


def plan(num_devices: int) -> list[Case]:
    """The baseline first, then FSDP2 and ZeRO-3 on one process, then on all the devices (a power of two)."""
    many = min(8, 2 ** int(math.log2(num_devices))) if num_devices >= 2 else 0
    cases = [Case("single_gpu", 1, peft) for peft in (False, True)]
    for processes in [1] + ([many] if many else []):
        cases += [Case(config, processes, peft) for config in ("fsdp2", "deepspeed_zero3") for peft in (False, True)]
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Workspace
# ---------------------------------------------------------------------------------------------------------------


WORKSPACE_FILE = "workspace.json"


def build_workspace(work: str, size: str) -> dict:
    """Synthetic LUME data, a tokenizer trained on it, a Llama built from a config, perturb negatives; a folder that
    already holds a workspace of this size (another GPU benchmark built it: benchmarks/gpu_proof.py) is reused."""
    marker = os.path.join(work, WORKSPACE_FILE)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as handle:
            built = json.load(handle)
        if built.get("size") == size:
            return built["workspace"]
    from gnm_trainer.data import load_unlearning_data
    from gnm_trainer.data.synthetic import make_synthetic_lume, write_lume_folder
    from gnm_trainer.negatives import perturb_negatives
    from gnm_trainer.negatives.store import write_negatives
    from gnm_trainer.target import build_tiny_llama, train_tokenizer

    dimensions = dict(SIZES[size])
    dataset = make_synthetic_lume(seed=0, num_documents=40)
    write_lume_folder(dataset, os.path.join(work, "data"))
    texts = [f"{row['input']} {row['output']}" for key in ("forget_train", "retain_train") for row in dataset[key]]
    tokenizer = train_tokenizer(texts, vocab_size=dimensions.pop("vocab_size"))
    model = build_tiny_llama(tokenizer, max_position_embeddings=1024, **dimensions)
    model.save_pretrained(os.path.join(work, "target"))
    tokenizer.save_pretrained(os.path.join(work, "target"))
    forget = load_unlearning_data(dataset["forget_train"], "forget")
    retain = load_unlearning_data(dataset["retain_train"], "retain")
    write_negatives(perturb_negatives(forget, retain, levels=3, seed=0), os.path.join(work, "negatives.jsonl"))
    workspace = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocabulary": len(tokenizer),
        "forget_rows": len(forget),
        **dimensions,
    }
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"size": size, "workspace": workspace}, handle)
    return workspace


# ---------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------


def launch_command(case: Case, work: str, steps: int, dry_run: bool) -> list[str]:
    run_dir = os.path.join(work, "runs", case.name)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(CONFIGS, f"{case.config}.yaml"), "--num_processes", str(case.processes),
        "--num_machines", "1", "--main_process_port", "0",
    ]  # fmt: skip
    if dry_run:
        command += ["--mixed_precision", "no"]
    command += [
        WORKER, os.path.join(work, "reports", case.name),
        "--model_name_or_path", os.path.join(work, "target"), "--data_dir", os.path.join(work, "data"),
        "--negatives_path", os.path.join(work, "negatives.jsonl"), "--loss_terms", "ga", "klr", "gnm",
        "--max_steps", str(steps), "--per_device_train_batch_size", str(EFFECTIVE_BATCH // case.processes),
        "--learning_rate", "1e-4", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--seed", "0", "--output_dir", run_dir,
    ]  # fmt: skip
    return command + (LORA_FLAGS if case.peft else [])


def run_case(case: Case, work: str, steps: int, dry_run: bool, timeout: float) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if dry_run:
        env.update(OMP_NUM_THREADS="1", GNM_BENCH_GATHER_ALWAYS="1")
    log_path = os.path.join(work, "logs", f"{case.name}.log")
    case.result = run_logged(launch_command(case, work, steps, dry_run), log_path, env, timeout)
    if case.result["exit_code"] == 0:
        case.result.update(read_run(case, work))


def read_run(case: Case, work: str) -> dict:
    report_dir = os.path.join(work, "reports", case.name)
    ranks = []
    for name in sorted(os.listdir(report_dir)):
        with open(os.path.join(report_dir, name), encoding="utf-8") as handle:
            ranks.append(json.load(handle))
    with open(os.path.join(work, "runs", case.name, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    steps = [{k: v for k, v in entry.items() if k.startswith("loss") or k == "grad_norm"} for entry in history
             if "loss" in entry]  # fmt: skip
    first = ranks[0] if ranks else {}
    memory_key = "peak_gpu_memory_gib" if "peak_gpu_memory_gib" in first else "peak_cpu_rss_gib"
    return {
        "processes_seen": [r["process_index"] for r in ranks],
        "distributed_type": first.get("distributed_type"),
        "reference_type": first.get("reference_type") or first.get("reference_mode"),
        "reference_fraction_per_process": _fraction(first, "reference"),
        "model_fraction_per_process": _fraction(first, "model"),
        memory_key: [round(r.get(memory_key, float("nan")), 3) for r in ranks],
        "train_and_save_seconds": round(first.get("train_and_save_seconds", float("nan")), 1),
        "final_save_sharded_only": first.get("final_save_sharded_only"),
        "steps": steps,
        "loads_back": load_back(first.get("weights_dir"), work, case.peft),
    }


def _fraction(report: dict, which: str) -> float | None:
    total = report.get(f"{which}_total_elements")
    return round(report[f"{which}_local_elements"] / total, 4) if total else None


def load_back(weights_dir: str | None, work: str, peft: bool) -> str:
    """"ok", or why the saved result does not load as a user would load it."""
    try:
        from transformers import AutoModelForCausalLM

        if peft:
            from peft import PeftModel

            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(os.path.join(work, "target")), weights_dir)
        else:
            AutoModelForCausalLM.from_pretrained(weights_dir)
        return "ok"
    except Exception as error:  # noqa: BLE001 - reported, not raised: the benchmark goes on with the next case
        return f"{type(error).__name__}: {error}"[:300]


# ---------------------------------------------------------------------------------------------------------------
# Comparison and report
# ---------------------------------------------------------------------------------------------------------------


def compare(cases: list[Case]) -> None:
    """Add each case's largest per-step loss difference from the baseline of the same variant, and its verdict."""
    baselines = {case.peft: case for case in cases if case.config == "single_gpu"}
    for case in cases:
        result = case.result
        if not result.get("steps"):
            result["success"] = False
            continue
        losses = [value for step in result["steps"] for key, value in step.items() if key.startswith("loss")]
        finite = all(math.isfinite(value) for value in losses)
        base = baselines.get(case.peft)
        if base is not None and base is not case and base.result.get("steps"):
            pairs = list(zip(result["steps"], base.result["steps"], strict=False))
            result["max_loss_difference_vs_single_gpu"] = max(
                abs(step[key] - other[key]) for step, other in pairs for key in step if key.startswith("loss")
            )
        result["step1_klr"] = result["steps"][0].get("loss_klr")
        result["success"] = (
            finite and result["loads_back"] == "ok" and len(result["processes_seen"]) == case.processes
        )


def write_results(cases: list[Case], workspace: dict, settings: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    payload = {"settings": settings, "model": workspace, "cases": [{"name": c.name, **asdict(c)} for c in cases]}
    with open(os.path.join(out, "gpu_distributed.json"), "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
    with open(os.path.join(out, "gpu_distributed.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(cases, workspace, settings))


def markdown(cases: list[Case], workspace: dict, settings: dict) -> str:
    lines = [
        f"# Distributed unlearning benchmark ({settings['device']})",
        "",
        f"Llama built from a config: {workspace.get('parameters', 0) / 1e6:.1f}M parameters "
        f"(hidden {workspace.get('hidden_size')}, {workspace.get('num_layers')} layers, vocabulary "
        f"{workspace.get('vocabulary')}); recipe ga+klr+gnm, {settings['steps']} steps, effective batch "
        f"{EFFECTIVE_BATCH}, {'no mixed precision (dry run)' if settings['dry_run'] else 'bf16'}.",
        "",
        "| case | ok | wall s | train+save s | peak memory GiB / process | model share | reference | "
        "reference share | step-1 klr | max loss diff vs single | loads back |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        r = case.result
        memory = r.get("peak_gpu_memory_gib", r.get("peak_cpu_rss_gib", []))
        difference = r.get("max_loss_difference_vs_single_gpu")
        cells = [
            case.name, "yes" if r.get("success") else f"**no** ({r.get('exit_code', 'skipped')})",
            r.get("wall_seconds", "-"), r.get("train_and_save_seconds", "-"),
            ", ".join(f"{m:.2f}" for m in memory) or "-",
            r.get("model_fraction_per_process", "-"), r.get("reference_type") or "-",
            r.get("reference_fraction_per_process", "-"),
            "-" if r.get("step1_klr") is None else f"{r['step1_klr']:.1e}",
            "-" if difference is None else f"{difference:.2e}", r.get("loads_back", "-"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += ["", "Failed cases keep the tail of their log in gpu_distributed.json."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or RESULTS)
    parser.add_argument("--work", default=None, help="scratch folder for models and runs (default: a new temp folder)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per case (default 30; dry run 3)")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for all cases; later ones are skipped")
    parser.add_argument("--case-timeout", type=float, default=180.0, help="seconds for one case")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check: tiny model, 2 CPU processes")
    parser.add_argument("--max-processes", type=int, default=None,
                        help="launch at most this many processes (default: every GPU; 2 in a dry run)")
    args = parser.parse_args()

    import torch

    started = time.perf_counter()
    num_devices = 2 if args.dry_run else torch.cuda.device_count()
    if args.max_processes:
        num_devices = min(num_devices, args.max_processes)
    if num_devices == 0:
        print("no GPU found: run on a GPU machine, or pass --dry-run for a CPU plumbing check", file=sys.stderr)
        return 2
    steps = args.steps or (3 if args.dry_run else 30)
    work = args.work or tempfile.mkdtemp(prefix="gnm-gpu-distributed-")
    settings = {
        "device": "CPU dry run" if args.dry_run else f"{num_devices}x {torch.cuda.get_device_name(0)}",
        "steps": steps, "dry_run": args.dry_run, "torch": torch.__version__,
    }  # fmt: skip
    workspace = build_workspace(work, "tiny" if args.dry_run else "100m")
    print(f"workspace ready in {time.perf_counter() - started:.0f}s: {workspace}", flush=True)
    cases = plan(num_devices)
    for case in cases:
        left = args.budget - (time.perf_counter() - started)
        if left < 45:
            case.result = {"exit_code": "skipped (time budget)"}
            continue
        run_case(case, work, steps, args.dry_run, timeout=min(args.case_timeout, left))
        os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
        shutil.copy(case.result["log"], os.path.join(args.out, "logs"))
        compare(cases)
        write_results(cases, workspace, settings, args.out)
        status = "ok" if case.result.get("success") else f"FAILED ({case.result.get('exit_code')})"
        print(f"{case.name}: {status} in {case.result['wall_seconds']}s", flush=True)
    compare(cases)
    write_results(cases, workspace, settings, args.out)
    print(markdown(cases, workspace, settings))
    return 0 if all(case.result.get("success") for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
