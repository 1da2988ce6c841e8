"""`gnm unlearn`: unlearn a model with GNMTrainer from a YAML recipe and/or command-line flags.

Parsed by TRL's `TrlParser` over (`UnlearnScriptArguments`, `GNMConfig`, TRL's `ModelConfig`): `--config recipe.yaml`
sets values, flags override them, and an unknown key in either is an error.

Examples:

    gnm unlearn --config recipes/tiny/embedded/config_gnm_lora.yaml
    gnm unlearn --model_name_or_path ./target --data_dir ./data --negatives_path negatives.jsonl \\
        --use_peft --lora_target_modules all-linear --max_steps 100 --output_dir runs/gnm
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m gnm_trainer.cli unlearn --config ...
"""

import os
from dataclasses import dataclass, field

from ..errors import GNMInputError


@dataclass
class UnlearnScriptArguments:
    """Where the data comes from and which PEFT method to use (the rest is in GNMConfig and ModelConfig)."""

    data_dir: str | None = field(
        default=None, metadata={"help": "Folder holding forget and retain files (LUME names, harness names, parquet)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id holding forget and retain splits."})
    data_partition: str = field(
        default="train", metadata={"help": "Which partition to unlearn.", "choices": ["train", "validation"]}
    )
    negatives_path: str | None = field(default=None, metadata={"help": "Gradual negatives file (jsonl or parquet)."})
    peft_method: str = field(
        default="lora",
        metadata={"help": "PEFT method used with --use_peft.", "choices": ["lora", "adalora"]},
    )
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA's target average rank (init rank: lora_r)."})
    adalora_tinit: int = field(default=0, metadata={"help": "AdaLoRA's initial fine-tuning steps without pruning."})
    adalora_tfinal: int = field(default=0, metadata={"help": "AdaLoRA's final fine-tuning steps without pruning."})
    adalora_delta_t: int = field(default=1, metadata={"help": "AdaLoRA's steps between two rank allocations."})
    overwrite_output: bool = field(
        default=False,
        metadata={
            "help": "Train again into an output_dir that already holds a finished run (a final model or adapter), "
            "replacing it. A folder holding only checkpoints is not finished: the run resumes from the last one."
        },
    )


def make_parser(help_all: bool = False):
    """TRL's `TrlParser` over the three argument groups. Its `--help` shows our options first, in groups (the
    others still parse); `--help_all` (or `help_all=True`) shows every option. Recipe keys may use hyphens."""
    from trl import ModelConfig, TrlParser

    from ..gnm_config import GNMConfig
    from .options import normalise_recipe_keys
    from .unlearn_help import (
        USAGE, RawDescriptionDefaultsFormatter, describe_negated_flags, short_help_groups, show_short_help,
    )

    class UnlearnParser(TrlParser):
        def set_defaults_with_config(self, **config):
            """TRL's, with hyphenated recipe keys read as their underscore spelling (`max-steps:` is `max_steps:`)."""
            return super().set_defaults_with_config(**normalise_recipe_keys(config, "--config"))

    argument_types = (UnlearnScriptArguments, GNMConfig, ModelConfig)
    parser = UnlearnParser(
        argument_types, prog="gnm unlearn", usage=USAGE, description=__doc__,
        formatter_class=RawDescriptionDefaultsFormatter,
    )
    describe_negated_flags(parser)
    if not help_all:
        show_short_help(parser, short_help_groups(UnlearnScriptArguments, GNMConfig), lambda: make_parser(True))
    return parser


def parse_arguments(argv: list[str]):
    """Parse flags and `--config`; YAML and flags are strict (unknown keys are errors), and a `--report_to`
    integration that is not installed is named before anything loads."""
    from .options import read_recipe, recipe_path
    from .reporting import check_reporting_integrations

    path = recipe_path(argv)
    if path is not None:
        read_recipe(path)  # a clear error for a missing file, bad YAML or one key spelled two ways, before TRL reads it
    parser = make_parser()
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except ValueError as error:
        raise GNMInputError(str(error)) from error
    check_reporting_integrations(training_args.report_to)
    return script_args, training_args, model_args


def build_peft_config(script_args: UnlearnScriptArguments, model_args):
    """LoRA through TRL's `get_peft_config`, or AdaLoRA from the same `lora_*` flags; None without `--use_peft`."""
    from trl import get_peft_config

    if not model_args.use_peft:
        return None
    if script_args.peft_method == "lora":
        return get_peft_config(model_args)
    from peft import AdaLoraConfig

    if script_args.adalora_target_r > model_args.lora_r:
        raise GNMInputError(
            f"adalora_target_r: {script_args.adalora_target_r} is above the initial rank lora_r={model_args.lora_r}; "
            "AdaLoRA prunes ranks from lora_r down to adalora_target_r"
        )
    return AdaLoraConfig(
        task_type=model_args.lora_task_type,
        init_r=model_args.lora_r,
        target_r=script_args.adalora_target_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        tinit=script_args.adalora_tinit,
        tfinal=script_args.adalora_tfinal,
        deltaT=script_args.adalora_delta_t,
        # A placeholder that passes PEFT's own check; GNMTrainer sets the real training length.
        total_step=script_args.adalora_tinit + script_args.adalora_tfinal + 1,
    )


# Files that a finished run leaves directly in output_dir (checkpoints live in checkpoint-* sub-folders).
ADAPTER_FILES = ("adapter_config.json",)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def finished_run_files(output_dir: str) -> list[str]:
    """The final-model files in `output_dir` (an adapter, or `config.json` with weights); [] when there are none."""
    present = [name for name in ADAPTER_FILES if os.path.isfile(os.path.join(output_dir, name))]
    weights = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(output_dir, name))]
    if weights and os.path.isfile(os.path.join(output_dir, "config.json")):
        present += ["config.json", *weights]
    return present


def refuse_finished_output(output_dir: str, overwrite_output: bool) -> None:
    """A GNMInputError when `output_dir` already holds a finished run, unless the user asked to overwrite it."""
    found = finished_run_files(output_dir)
    if found and not overwrite_output:
        raise GNMInputError(
            f"{output_dir}: output_dir already holds a finished run ({', '.join(found)}); choose another output_dir "
            "or pass --overwrite_output true to replace it"
        )


def model_init_kwargs(model_args) -> dict:
    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def run_unlearning(script_args, training_args, model_args):
    """Load, train (resuming from the last checkpoint when there is one), save; returns the trainer."""
    from transformers.trainer_utils import get_last_checkpoint

    from ..data.loading import load_unlearning_data
    from ..gnm_trainer import GNMTrainer

    if model_args.model_name_or_path is None:
        raise GNMInputError("model_name_or_path: required (a local model folder or a Hub id)")
    source = script_args.data_dir or script_args.dataset_name
    if source is None:
        raise GNMInputError("data_dir / dataset_name: one of them is required")
    if script_args.data_dir and script_args.dataset_name:
        raise GNMInputError("data_dir and dataset_name: give only one")
    refuse_finished_output(training_args.output_dir, script_args.overwrite_output)
    training_args.model_init_kwargs = model_init_kwargs(model_args)
    forget = load_unlearning_data(source, "forget", script_args.data_partition)
    needs_retain = {"gd", "klr", "rm"}.intersection(training_args.loss_terms)
    retain = load_unlearning_data(source, "retain", script_args.data_partition) if needs_retain else None
    trainer = GNMTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=forget,
        retain_dataset=retain,
        negative_dataset=script_args.negatives_path,
        peft_config=build_peft_config(script_args, model_args),
    )
    last_checkpoint = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    result = trainer.train(resume_from_checkpoint=last_checkpoint)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)  # also uploads, with our model card, when --push_to_hub is set
    return trainer


def main(argv: list[str]) -> None:
    script_args, training_args, model_args = parse_arguments(argv)
    run_unlearning(script_args, training_args, model_args)
