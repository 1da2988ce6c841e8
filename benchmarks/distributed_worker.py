"""One process of a `gnm unlearn` benchmark run: train, make sure full weights are on disk, report.

    accelerate launch --config_file accelerate_configs/<config>.yaml benchmarks/distributed_worker.py \
        REPORT_DIR [gnm unlearn arguments...]

Runs the code path of `gnm unlearn` (parse, train, save), seeded first so that LoRA starts from the same weights in
every run. When the final save wrote no weights (FSDP with a SHARDED_STATE_DICT only shards checkpoints), it gathers
them with `gnm_trainer.distributed.save_full_weights` into `<output_dir>/full`. Writes REPORT_DIR/rank<i>.json:
`gnm_trainer.distributed.launch_report` plus this process's peak memory, the training wall time and where the
loadable weights are.
"""

import json
import os
import resource
import sys
import time


def peak_memory_gib() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str]) -> int:
    import torch
    from transformers import set_seed

    from gnm_trainer.cli.unlearn import parse_arguments, run_unlearning
    from gnm_trainer.distributed import launch_report, save_full_weights, saves_sharded_only

    report_dir, arguments = argv[0], argv[1:]
    set_seed(0)
    started = time.perf_counter()
    script_args, training_args, model_args = parse_arguments(arguments)
    trainer = run_unlearning(script_args, training_args, model_args)
    seconds = time.perf_counter() - started
    weights_dir = training_args.output_dir
    sharded_only = saves_sharded_only(trainer)
    if sharded_only or os.environ.get("GNM_BENCH_GATHER_ALWAYS") == "1":
        weights_dir = os.path.join(training_args.output_dir, "full")
        save_full_weights(trainer, weights_dir)
    report = {
        **launch_report(trainer),
        **peak_memory_gib(),
        "train_and_save_seconds": seconds,
        "final_save_sharded_only": sharded_only,
        "weights_dir": weights_dir,
    }
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"rank{report['process_index']}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
