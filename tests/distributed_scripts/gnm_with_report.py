"""Run one `gnm` command as the console script does, then write a report of what this process ran.

    python gnm_with_report.py REPORT_DIR unlearn|evaluate [arguments...]

Writes REPORT_DIR/rank<i>.json on every process: its index and the number of processes and distributed type that
accelerate saw. For `unlearn` (the code path of `gnm unlearn`: parse, train, save) it is
`gnm_trainer.distributed.launch_report`: also the ZeRO stage and, for the reference model and the trained model,
the parameter elements this process holds against the whole model's (about 1/N on each of N processes if sharded).

It seeds the global RNG first: LoRA's random init runs before the Trainer seeds anything, so without this the adapter
starts from different weights in every run and runs could not be compared step by step.
"""

import json
import os
import sys


def layout_report() -> dict:
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type).split(".")[-1],
    }


def main(argv: list[str]) -> int:
    from transformers import set_seed

    report_dir, command, arguments = argv[0], argv[1], argv[2:]
    set_seed(0)
    if command == "unlearn":
        from gnm_trainer.cli.unlearn import parse_arguments, run_unlearning
        from gnm_trainer.distributed import launch_report

        trainer = run_unlearning(*parse_arguments(arguments))
        report = launch_report(trainer)
    else:
        from gnm_trainer.cli import main as gnm

        code = gnm([command, *arguments])
        if code:
            return code
        report = layout_report()
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"rank{report['process_index']}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    shut_down_processes()
    return 0


def shut_down_processes() -> None:
    """Wait for every process (the main one may still be writing files), then close the process group: a process
    that exits while another still talks to it can abort the launch."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
