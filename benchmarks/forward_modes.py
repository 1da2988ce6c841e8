"""The layouts of a GNMTrainer step: time per step and peak memory.

The padded step's `forward_passes` (one forward pass for all groups padded to the longest, one per group, or `auto`)
against the packed step (`padding_free=True`: every sequence end to end, no padding). Each mode runs in its own
subprocess so that the operating system's peak-memory figure (VmHWM) belongs to it alone. Prints a table and the
ratios; the packed mode is left out, with a line, where the library has no `padding_free`.

    python benchmarks/forward_modes.py [--steps 8] [--batch-size 4] [--hidden-size 256] [--num-layers 4]
"""

import argparse
import json
import subprocess
import sys
import time

from speedbench.common import padding_options, supports_padding_free  # benchmarks/ is this script's folder
from speedbench.memory import peak_rss_mib  # VmHWM: this process's own peak

MODES = ("one", "per_group", "auto", "packed")  # the padded step's forward_passes, then the packed step


def run_mode(mode: str, steps: int, batch_size: int, hidden_size: int, num_layers: int) -> dict:
    import torch
    from peft import LoraConfig

    from gnm_trainer import GNMConfig, GNMTrainer
    from gnm_trainer.data.synthetic import make_synthetic_lume
    from gnm_trainer.negatives import perturb_negatives
    from gnm_trainer.target import build_tiny_llama, train_tokenizer

    data = make_synthetic_lume(seed=0)
    forget, retain = data["forget_train"], data["retain_train"]
    tokenizer = train_tokenizer([f"{r['input']} {r['output']}" for r in forget + retain], vocab_size=2048)
    model = build_tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=4)
    from gnm_trainer.data import load_unlearning_data

    forget_rows = load_unlearning_data(forget, "forget")
    negatives = perturb_negatives(forget_rows, load_unlearning_data(retain, "retain"), levels=4, seed=0)
    args = GNMConfig(
        output_dir="/tmp/gnm-forward-modes",
        loss_terms=["ga", "gd", "klr", "rm", "gnm"],
        forward_passes="auto" if mode == "packed" else mode,
        **padding_options(mode == "packed"),
        per_device_train_batch_size=batch_size,
        max_steps=steps + 2,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = GNMTrainer(
        model, args, train_dataset=forget, retain_dataset=retain, negative_dataset=negatives,
        processing_class=tokenizer, peft_config=LoraConfig(r=8, target_modules="all-linear"),
    )
    timings = []

    class Timer(__import__("transformers").TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            timings.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    torch.manual_seed(0)
    trainer.train()
    measured = sorted(timings[2:])  # the first two steps warm up
    return {
        "mode": mode,
        "median_step_s": measured[len(measured) // 2],
        "peak_rss_mib": peak_rss_mib(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = (args.steps, args.batch_size, args.hidden_size, args.num_layers)
    if args.mode:
        print(json.dumps(run_mode(args.mode, *settings)))
        return
    results = {}
    modes = MODES if supports_padding_free() else MODES[:-1]
    if not supports_padding_free():
        print("packed: not run (this gnm_trainer has no GNMConfig.padding_free)")
    for mode in modes:
        command = [sys.executable, __file__, "--mode", mode] + [
            f"--{name}={value}" for name, value in zip(("steps", "batch-size", "hidden-size", "num-layers"), settings)
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    print(f"{'mode':<14}{'median step (s)':>18}{'peak RSS (MiB)':>18}")
    for mode, result in results.items():
        print(f"{mode:<14}{result['median_step_s']:>18.3f}{result['peak_rss_mib']:>18.0f}")
    for mode in [mode for mode in modes if mode != "per_group"]:
        speed = results["per_group"]["median_step_s"] / results[mode]["median_step_s"]
        memory = results[mode]["peak_rss_mib"] / results["per_group"]["peak_rss_mib"]
        print(f"{mode}: {speed:.2f}x the speed of per_group, at {memory:.2f}x its peak memory")


if __name__ == "__main__":
    main()
