"""One forward pass for all groups vs one forward per group: time per GNMTrainer step and peak memory.

Each mode runs in its own subprocess so that the operating system's peak-memory figure (VmHWM) belongs to it
alone. Prints a table and the ratios.

    python benchmarks/forward_modes.py [--steps 8] [--batch-size 4] [--hidden-size 256] [--num-layers 4]
"""

import argparse
import json
import subprocess
import sys
import time

from speedbench.memory import peak_rss_mib  # VmHWM: this process's own peak (benchmarks/ is this script's folder)


def run_mode(forward_passes: str, steps: int, batch_size: int, hidden_size: int, num_layers: int) -> dict:
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
        forward_passes=forward_passes,
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
        "forward_passes": forward_passes,
        "median_step_s": measured[len(measured) // 2],
        "peak_rss_mib": peak_rss_mib(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--mode", choices=["one", "per_group", "auto"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = (args.steps, args.batch_size, args.hidden_size, args.num_layers)
    if args.mode:
        print(json.dumps(run_mode(args.mode, *settings)))
        return
    results = {}
    for mode in ("one", "per_group", "auto"):
        command = [sys.executable, __file__, "--mode", mode] + [
            f"--{name}={value}" for name, value in zip(("steps", "batch-size", "hidden-size", "num-layers"), settings)
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    print(f"{'mode':<14}{'median step (s)':>18}{'peak RSS (MiB)':>18}")
    for mode, result in results.items():
        print(f"{mode:<14}{result['median_step_s']:>18.3f}{result['peak_rss_mib']:>18.0f}")
    for mode in ("one", "auto"):
        speed = results["per_group"]["median_step_s"] / results[mode]["median_step_s"]
        memory = results[mode]["peak_rss_mib"] / results["per_group"]["peak_rss_mib"]
        print(f"{mode}: {speed:.2f}x the speed of per_group, at {memory:.2f}x its peak memory")


if __name__ == "__main__":
    main()
