"""The SemEval-2025 Task 4 submission function: `unlearn(input_model_path, output_dir, forget_dir, retain_dir)`.

The task's harness calls it with the target model's folder and two data folders (`forget_dir` holds `forget.parquet`
and `forget.jsonl`, `retain_dir` likewise), gives it one hour on 8×A100, and scores the ONE checkpoint left in
`output_dir`, loaded with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.

What it runs: the paper's recipe. Model-free gradual negatives (`perturb`, K levels, seconds for the whole forget
set), the loss ga 0.5 + klr 5 + gnm 0.04, LoRA on every linear layer, the reference model being the same model with
its adapter disabled (no second copy), AdamW with linear decay and no warm-up. Then the adapter is merged and the
full weights (bf16 on GPU) and the tokenizer are written to `output_dir`, by the main process only.

On 8 GPUs (DDP; each process holds the model, LoRA keeps the optimizer small):

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 8 \\
        -m gnm_trainer.semeval_submission MODEL_DIR OUTPUT_DIR FORGET_DIR RETAIN_DIR [--max_steps 200 ...]

or call `unlearn(...)` from the harness's script started with `accelerate launch`. Every process must call it.
"""

import argparse
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from .errors import GNMInputError


@dataclass
class SubmissionSettings:
    """Settings of `unlearn` that are not `GNMConfig` fields, and the `GNMConfig` fields it sets differently.

    The defaults are sized for the task's budget (1 hour on 8×A100 for OLMo-7B; the 1B model is faster). The paper
    trained 800 steps at batch size 1, i.e. 800 forget examples, about 0.7 epoch of the 7B forget set (1,112 rows).
    Here one epoch at batch 1 per GPU: 1,112 / 8 = 139 optimizer steps, a few minutes of training on A100s, which
    leaves most of the hour as margin; `time_budget_minutes` stops training early if the machine is slower.

    Parameters:
        learning_rate: AdamW learning rate (the paper's 1e-4), linear decay, no warm-up.
        num_train_epochs: passes over the forget set (ignored when `max_steps` > 0).
        max_steps: optimizer steps; -1 uses `num_train_epochs`.
        per_device_train_batch_size, gradient_accumulation_steps: batch size 1 per GPU as in the paper.
        negative_levels: K, the number of gradual negative levels per forget row (model-free `perturb` backend).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA on every linear layer.
        max_length, max_prompt_length: tokens of prompt + completion; prompts longer than `max_prompt_length` are cut
            from the left (LUME's sentence-completion prompts are half documents).
        gradient_checkpointing: recompute activations in the backward pass (fits a 7B model with three sequences
            per step on 40 GB cards; costs about a third more time, which the budget has).
        time_budget_minutes: training stops (on every process together) once this long has passed since `unlearn`
            started, so that merging and saving still fit in the hour.
        seed: seed of training and of the negatives.
    """

    learning_rate: float = 1e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    negative_levels: int = 3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"
    max_length: int = 512
    max_prompt_length: int | None = 384
    gradient_checkpointing: bool = True
    time_budget_minutes: float = 40.0
    seed: int = 42


# Fields of SubmissionSettings that are GNMConfig fields too (passed through); the others are used here.
_OWN_SETTINGS = {
    "negative_levels", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "time_budget_minutes"
}


class TimeBudgetCallback(TrainerCallback):
    """Stops training once `deadline` (a `time.monotonic()` value) has passed. Under several processes the decision
    is all-reduced, so every process stops at the same step (one stopping alone would hang the others)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.stopped_early = False

    def on_step_end(self, args, state, control, **kwargs):
        over = torch.tensor([float(time.monotonic() > self.deadline)], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
        if over.item() > 0 and not control.should_training_stop:
            self.stopped_early = state.global_step < state.max_steps
            control.should_training_stop = True
        return control


def split_overrides(overrides: dict[str, Any]) -> tuple[SubmissionSettings, dict[str, Any]]:
    """`(settings, other GNMConfig fields)` from `unlearn`'s keyword overrides; an unknown name is an error."""
    from .gnm_config import GNMConfig

    own = {f.name for f in dataclasses.fields(SubmissionSettings)}
    config_fields = {f.name for f in dataclasses.fields(GNMConfig) if f.init}
    unknown = sorted(set(overrides) - own - config_fields)
    if unknown:
        raise GNMInputError(
            f"unlearn: unknown setting(s) {unknown}; expected fields of SubmissionSettings or GNMConfig"
        )
    settings = SubmissionSettings(**{key: value for key, value in overrides.items() if key in own})
    return settings, {key: value for key, value in overrides.items() if key not in own}


def submission_config(output_dir: str, settings: SubmissionSettings, config_overrides: dict[str, Any]):
    """The `GNMConfig` of a submission: the paper's loss (GNMConfig's defaults), bf16 on GPU, nothing saved or
    reported during training."""
    from .gnm_config import GNMConfig

    values = {
        name: getattr(settings, name)
        for name in (f.name for f in dataclasses.fields(SubmissionSettings))
        if name not in _OWN_SETTINGS
    }
    values.update(
        output_dir=output_dir,
        bf16=torch.cuda.is_available(),
        lr_scheduler_type="linear",
        warmup_steps=0,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
    )
    values.update(config_overrides)
    return GNMConfig(**values)


def unlearn(input_model_path: str, output_dir: str, forget_dir: str, retain_dir: str, **overrides) -> dict[str, Any]:
    """Unlearn `forget_dir` from the model in `input_model_path` and write merged weights and tokenizer to
    `output_dir`.

    Args:
        input_model_path: the target model's folder (or Hub id).
        output_dir: where the one checkpoint is written (created if needed; the files it holds are replaced).
        forget_dir, retain_dir: folders holding `forget.jsonl` / `forget.parquet` and `retain.jsonl` /
            `retain.parquet` (any layout `load_unlearning_data` reads).
        overrides: any field of `SubmissionSettings` or `GNMConfig` (e.g. `max_steps=200`, `gd_weight=...` together
            with `loss_terms=[...]`).

    Returns:
        `{"output_dir", "steps", "stopped_by_time_budget", "train_metrics"}` (the same on every process).
    """
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data.loading import load_unlearning_data
    from .gnm_trainer import GNMTrainer
    from .io_utils import atomic_files_into
    from .negatives import perturb_negatives

    started = time.monotonic()
    settings, config_overrides = split_overrides(overrides)
    forget = load_unlearning_data(forget_dir, "forget")
    retain = load_unlearning_data(retain_dir, "retain")
    negatives = perturb_negatives(forget, retain, levels=settings.negative_levels, seed=settings.seed)
    args = submission_config(output_dir, settings, config_overrides)

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(input_model_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(input_model_path)
    except OSError as error:
        raise GNMInputError(f"{input_model_path}: cannot load the model or its tokenizer ({error})") from error
    time_budget = TimeBudgetCallback(started + 60 * settings.time_budget_minutes)
    trainer = GNMTrainer(
        model,
        args,
        train_dataset=forget,
        retain_dataset=retain,
        negative_dataset=negatives,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            task_type="CAUSAL_LM",
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=settings.lora_target_modules,
        ),
        callbacks=[time_budget],
    )
    result = trainer.train()

    if trainer.args.should_save:
        # Training is over: merge in place (no second copy of the weights) and write each file atomically.
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        with atomic_files_into(output_dir) as staging:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    trainer.accelerator.wait_for_everyone()
    return {
        "output_dir": output_dir,
        "steps": trainer.state.global_step,
        "stopped_by_time_budget": time_budget.stopped_early,
        "train_metrics": result.metrics,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m gnm_trainer.semeval_submission MODEL OUTPUT FORGET RETAIN [--setting value ...]`."""
    parser = argparse.ArgumentParser(prog="python -m gnm_trainer.semeval_submission", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("input_model_path", "output_dir", "forget_dir", "retain_dir"):
        parser.add_argument(name)
    for field in dataclasses.fields(SubmissionSettings):
        if field.type in (bool, "bool"):
            parser.add_argument(f"--{field.name}", type=lambda text: text.lower() in ("1", "true", "yes"), default=None)
        else:
            kind = type(field.default) if field.default is not None else int
            parser.add_argument(f"--{field.name}", type=kind, default=None)
    arguments = vars(parser.parse_args(argv))
    paths = [arguments.pop(name) for name in ("input_model_path", "output_dir", "forget_dir", "retain_dir")]
    return unlearn(*paths, **{key: value for key, value in arguments.items() if value is not None})


if __name__ == "__main__":
    main()
