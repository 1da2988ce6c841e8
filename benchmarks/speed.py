"""Speed and memory of gnm_trainer, side by side with the way the published code works (issues 5 and 11).

    python benchmarks/speed.py                          # cpu preset, all five measurements (under 10 minutes)
    python benchmarks/speed.py --preset gpu             # on a GPU machine: ~100M-300M models (under 8 minutes)
    python benchmarks/speed.py --preset smoke --only a,d   # seconds: what the test suite runs

Five measurements, each printed with its ratio, its target and PASS/MISS, all written to `--output` as JSON (one
module each in benchmarks/speedbench/):

(a) Seconds per training example of a GNMTrainer step (the paper's terms ga+klr+gnm, LoRA r8 on all linear layers,
    AdamW, batch `train_batch_size`, the library's default layout: packed where the model supports it) against a
    loop that works like the published code: one example at a time, one forward per term, each sequence at its own
    length, the reference a second full fp32 copy of the model. Second line: the same with today's padded step
    (`padding_free=False`), on the very same batches, so that the gain of packing shows.
(b) The same GNMTrainer step against its compute floor, timed right after it on the same batch and model: one
    forward and backward over the step's real tokens only (the sequences packed, no padding, the LM head only where
    a loss reads a logit), the adapter-disabled reference forward packed the same way, and the optimizer step.
    What is left is the trainer's own work: collation, packing, the loss math, the Trainer loop, metrics, the guard.
(c) Peak memory of LoRA training with `klr` (the adapter-disabled reference) against the same run with `gd` in its
    place, and against `reference_model="copy"`; and a step's own peak memory, packed against padded, on LUME's full
    lengths at the trainer's batch. Each variant runs in its own interpreter (VmHWM on a CPU,
    torch.cuda.max_memory_allocated on a GPU).
(d) Evaluation: `evaluate_model` (batched) against the organisers' loop (one generation and one NLL forward at a
    time); the generations and scores must be equal.
(e) Gradual negatives from a generator LLM: `generate_llm_negatives` batched against batch_size=1, same outputs.

Every model is a randomly initialised Llama built from a config with a tokenizer trained on the data (nothing is
downloaded); the data is LUME from ../shared/data/lume when that folder exists, else the package's synthetic LUME
set. Random weights never emit eos, so every generation runs to `max_new_tokens` in both loops.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_paths import DEFAULT_LUME, RESULTS  # noqa: E402
from speedbench.common import PRESETS, Preset, load_data  # noqa: E402
from speedbench.evaluation import measure_evaluation  # noqa: E402
from speedbench.memory import MEMORY_VARIANTS, measure_memory, run_memory_variant  # noqa: E402
from speedbench.negatives import measure_negatives  # noqa: E402
from speedbench.report import format_table, machine, table_rows, targets  # noqa: E402
from speedbench.training import measure_training  # noqa: E402

DEFAULT_OUTPUT = os.path.join(RESULTS, "speed.json")
MEASUREMENTS = ("a", "b", "c", "d", "e")


def tiny(preset: Preset) -> Preset:
    """`preset` with the smoke preset's model sizes and counts (its batch sizes kept): a CPU dry run of its code."""
    smoke = PRESETS["smoke"]
    kept = {"train_batch_size", "eval_batch_size", "negative_batch_size", "memory_batch_size"}
    return replace(smoke, **{name: getattr(preset, name) for name in kept})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the preset's code with the smoke sizes (a dry run)")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="measurements to run, e.g. a,d (default all)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON of every figure (default %(default)s)")
    parser.add_argument("--data", default=DEFAULT_LUME, help="LUME folder; the synthetic set is used when it is absent")
    parser.add_argument("--train-task", choices=["Task1", "Task2", "Task3"],
                        help="(a), (b), (c): train on rows of this task only (similar lengths); default all rows")
    parser.add_argument("--group-by-length", action="store_true",
                        help="(a), (b): GNMTrainer with train_sampling_strategy=group_by_length (less padding)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an integer field of the preset, e.g. --set eval_batch_size=32 (repeatable)")
    parser.add_argument("--memory-variant", choices=sorted(MEMORY_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(MEASUREMENTS))
    if unknown or not chosen:
        parser.error(f"--only: expected some of {','.join(MEASUREMENTS)}, got {args.only!r}")
    args.only = [name for name in MEASUREMENTS if name in chosen]
    integer_fields = {name for name, value in asdict(PRESETS["cpu"]).items() if isinstance(value, int)}
    args.overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in integer_fields or not value.isdigit():
            parser.error(f"--set {item}: expected FIELD=INTEGER with FIELD among {', '.join(sorted(integer_fields))}")
        args.overrides[name] = int(value)
    return args


def summarise(args, preset: Preset, data, figures: dict, seconds: dict, device: str) -> dict:
    rows = table_rows(figures, device)
    ways = {"min": "at least", "max": "at most"}
    return {
        "preset": args.preset + (" (tiny)" if args.tiny else ""), "preset_sizes": asdict(preset), "data": data.source,
        "machine": machine(),
        "targets": {name: {"target": target, "ratio_must_be": ways[way]} for name, (target, way) in
                    targets(device).items()},
        "figures": figures, "verdicts": {row[0]: row[4] for row in rows}, "table": format_table(rows),
        "measurement_seconds": seconds,
    }  # fmt: skip


def variant_arguments(args) -> list[str]:
    """The flags that a memory variant's own interpreter needs to rebuild this run's preset and data."""
    argv = ["--preset", args.preset, "--data", args.data] + (["--tiny"] if args.tiny else [])
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--train-task", args.train_task] if args.train_task else []
    return argv + [f"--set={item}" for item in args.set]


def measure(name: str, args, preset: Preset, data, device: str, work_dir: str, figures: dict) -> None:
    """Run measurement `name` into `figures` ((a) and (b) come from one run)."""
    if name in ("a", "b"):
        if name not in figures:
            sampling = "group_by_length" if args.group_by_length else "random"
            figures["a"], figures["b"] = measure_training(preset, data, device, work_dir, args.train_task, sampling)
    elif name == "c":
        figures["c"] = measure_memory(os.path.abspath(__file__), variant_arguments(args))
    elif name == "d":
        figures["d"] = measure_evaluation(preset, data, device)
    elif name == "e":
        figures["e"] = measure_negatives(preset, data, device)


def main(argv=None) -> dict:
    import torch

    from gnm_trainer.io_utils import atomic_write_json

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = replace(tiny(PRESETS[args.preset]) if args.tiny else PRESETS[args.preset], **args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_data(args.data)
    with tempfile.TemporaryDirectory(prefix="gnm-speed-") as work_dir:
        if args.memory_variant:
            result = run_memory_variant(args.memory_variant, preset, data, device, work_dir, args.train_task)
            print(json.dumps(result))
            return result
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        figures, seconds = {}, {}
        for name in args.only:
            start = time.perf_counter()
            measure(name, args, preset, data, device, work_dir, figures)
            seconds[name] = time.perf_counter() - start
            print(f"[{name}] done in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
            # Written after every measurement, so that a run cut short (a GPU time limit) keeps what it measured.
            kept = {key: value for key, value in figures.items() if key in args.only}
            atomic_write_json(args.output, summarise(args, preset, data, kept, seconds, device))
    summary = summarise(args, preset, data, {key: figures[key] for key in args.only}, seconds, device)
    print(summary["table"])
    atomic_write_json(args.output, summary)
    return summary


if __name__ == "__main__":
    main()
