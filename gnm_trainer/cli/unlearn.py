"""`gnm unlearn`: unlearn a model with GNMTrainer from a YAML recipe and/or command-line flags.

Parsed by TRL's `TrlParser` over (`UnlearnScriptArguments`, `GNMConfig`, TRL's `ModelConfig`): `--config recipe.yaml`
sets values, flags override them, and an unknown key in either is an error.

Examples:

    gnm unlearn --config recipes/tiny/embedded/config_gnm_lora.yaml
    gnm unlearn --model_name_or_path ./target --data_dir ./data --negatives_path negatives.jsonl \\
        --use_peft --lora_target_modules all-linear --max_steps 100 --output_dir runs/gnm
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m gnm_trainer.cli unlearn --config ...
"""

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass, field

from ..errors import EXIT_COLLAPSED, GNMInputError, one_line
from ..io_utils import check_output_folder

logger = logging.getLogger(__name__)


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
    lora_layers_to_transform: list[int] | None = field(
        default=None,
        metadata={
            "help": "Adapt only these decoder layers (indices from 0; one index or a list), PEFT's "
            "`layers_to_transform`, for LoRA and AdaLoRA; e.g. SHA256's layers 0-5 on OLMo-7B. Needs "
            "lora_target_modules as module names (PEFT cannot combine it with 'all-linear'). None: every layer."
        },
    )
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA's target average rank (init rank: lora_r)."})
    adalora_tinit: int = field(default=0, metadata={"help": "AdaLoRA's initial fine-tuning steps without pruning."})
    adalora_tfinal: int = field(default=0, metadata={"help": "AdaLoRA's final fine-tuning steps without pruning."})
    adalora_delta_t: int = field(default=1, metadata={"help": "AdaLoRA's steps between two rank allocations."})
    eval_on_validation_steps: int | None = field(
        default=None,
        metadata={
            "help": "Score the model on the validation partition (SemEvalCallback) every this many optimizer steps "
            "and at the end, and save the best-scoring step as the final model (like load_best_model_at_end); "
            "<output_dir>/best/ holds it and the manifest names its step. None: off."
        },
    )
    validation_partition: str = field(
        default="validation", metadata={"help": "The partition of the training data source scored on validation."}
    )
    validation_mia_nonmembers: str | None = field(
        default=None,
        metadata={
            "help": "MIA non-members on validation: a file or a folder with nonmember.jsonl (members: the "
            "validation forget sc rows). None: no MIA part."
        },
    )
    validation_objective: str = field(
        default="aggregate-score",
        metadata={"help": "Validation result to maximise (a `gnm evaluate` key)."},
    )
    validation_max_new_tokens: int = field(default=256, metadata={"help": "Generation length on validation."})
    validation_batch_size: int = field(default=16, metadata={"help": "Batch size of the validation evaluation."})
    keep_best_membership_steps: int | None = field(
        default=None,
        metadata={
            "help": "From membership_start_step on, every this many optimizer steps and at the end, score a loss "
            "attack on the forget documents against membership_reference (MIA score, 1: they look unseen) and save "
            "the best step as the final model; <output_dir>/best/ holds it and the manifest names it under "
            "best_on_membership. None: off."
        },
    )
    membership_reference: str | None = field(
        default=None,
        metadata={
            "help": "Documents of the forget documents' kind that the model never read (a file with a 'document' "
            "field per row, or a folder with reference.jsonl); never the non-members an evaluation reports on "
            "(refused when they are the data_dir's mia/nonmember.jsonl)."
        },
    )
    membership_members: str | None = field(
        default=None,
        metadata={
            "help": "The forget documents scored against membership_reference (a file, or a folder with "
            "member.jsonl). None: the forget set's sentence-completion rows as whole documents."
        },
    )
    membership_start_step: int = field(
        default=0, metadata={"help": "The first step that keep_best_membership_steps scores and may keep."}
    )
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
    """LoRA through TRL's `get_peft_config`, or AdaLoRA from the same `lora_*` flags; None without `--use_peft`.
    What the config alone shows is checked here, before the model loads (`peft_checks`); the rest when GNMTrainer
    wraps the model."""
    import dataclasses

    from peft import AdaLoraConfig
    from trl import get_peft_config

    from ..peft_checks import build_config, check_config

    if not model_args.use_peft:
        return None
    target = model_args.lora_target_modules
    if isinstance(target, str) and target != "all-linear" and re.fullmatch(r"[\w.]+", target):
        # TRL turns one `--lora_target_modules q_proj` into a string, which PEFT reads as a regex of the full name
        model_args.lora_target_modules = [target]
    layers = chosen_layers(script_args.lora_layers_to_transform, model_args.lora_target_modules)
    if script_args.peft_method == "lora":
        config = build_config(lambda: dataclasses.replace(get_peft_config(model_args), layers_to_transform=layers))
    else:
        config = build_config(
            AdaLoraConfig,
            task_type=model_args.lora_task_type,
            init_r=model_args.lora_r,
            target_r=script_args.adalora_target_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            layers_to_transform=layers,
            # Every LoRA flag reaches the config, so that one AdaLoRA cannot use is refused, not dropped.
            target_parameters=model_args.lora_target_parameters,
            modules_to_save=model_args.lora_modules_to_save,
            use_rslora=model_args.use_rslora,
            tinit=script_args.adalora_tinit,
            tfinal=script_args.adalora_tfinal,
            deltaT=script_args.adalora_delta_t,
            # A placeholder that passes PEFT's own check; GNMTrainer sets the real training length.
            total_step=script_args.adalora_tinit + script_args.adalora_tfinal + 1,
        )
        if model_args.use_dora:
            config.use_dora = True  # AdaLoraConfig refuses it while built: check_config names the flag instead
    check_config(config)
    return config


def chosen_layers(layers, target_modules) -> list[int] | None:
    """`--lora_layers_to_transform` as PEFT's `layers_to_transform`: a list of layer indices (one index from a recipe
    becomes a list), None when unset. Whether the indices exist is checked against the model by GNMTrainer."""
    if layers is None:
        return None
    layers = [layers] if isinstance(layers, int) else layers
    if not layers or not all(isinstance(index, int) and not isinstance(index, bool) for index in layers):
        raise GNMInputError(f"lora_layers_to_transform: expected layer indices (integers), got {layers!r}")
    if isinstance(target_modules, str):
        raise GNMInputError(
            f"lora_layers_to_transform: PEFT cannot combine it with lora_target_modules {target_modules!r}; list the "
            "module names instead (e.g. q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)"
        )
    return sorted(set(layers))


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


def check_hub_access(training_args) -> None:
    """With `push_to_hub`, reach the Hub (creating the repository, as the Trainer would) before any work starts:
    an OSError naming the repository when the Hub is offline, unreachable or refuses the token."""
    if not training_args.push_to_hub:
        return
    from huggingface_hub import HfApi

    from ..hub import configured_repo_id, redact

    repo_id = configured_repo_id(training_args)
    failure = None
    try:
        HfApi(token=training_args.hub_token).create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
    except Exception as error:  # offline mode, network, authentication: the Hub client raises many types
        failure = f"{type(error).__name__}: {one_line(error)}"
    if failure is not None:  # raised outside `except`, so the original error (which may quote the token) is not chained
        raise OSError(
            redact(f"push_to_hub: cannot reach the Hugging Face Hub repository {repo_id} ({failure}); "
                   "check the network and `huggingface-cli login`, or train without --push_to_hub and upload later",
                   training_args.hub_token)
        )


# ---------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------

def checkpoint_problem(checkpoint: str) -> str | None:
    """Why `checkpoint` cannot be resumed from (a half-written save), or None when it looks complete."""
    state = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json"
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except (ValueError, OSError) as error:
        return f"unreadable trainer_state.json ({type(error).__name__})"
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if name.endswith(".safetensors") and not safetensors_complete(path):
            return f"truncated {name}"
        if name.endswith((".bin", ".pt", ".pth")) and not zipfile.is_zipfile(path):
            return f"truncated {name}"
    return None


def safetensors_complete(path: str) -> bool:
    """Whether a .safetensors file holds its whole header and every tensor the header announces."""
    import struct

    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if 8 + header_length > size:
                return False
            header = json.loads(handle.read(header_length))
    except (ValueError, OSError, struct.error):
        return False
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return 8 + header_length + max(ends, default=0) <= size


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was saved whole; newer half-written ones are skipped with
    one log line naming them. None when there is none (training starts from the beginning)."""
    from ..guard import checkpoints_before

    skipped = []
    for _, path in reversed(checkpoints_before(output_dir, math.inf)):
        name = os.path.basename(path)
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                logger.warning("Skipping incomplete %s; resuming from %s.", "; ".join(skipped), name)
            return path
        skipped.append(f"{name} ({problem})")
    if skipped:
        logger.warning(
            "Skipping incomplete %s; no complete checkpoint left, training from the start.", "; ".join(skipped)
        )
    return None


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_to_resume(training_args) -> str | None:
    """`resume_from_checkpoint`, else the last complete checkpoint in output_dir; none when output_dir holds a
    finished run that `--overwrite_output true` replaces (its checkpoints belong to that run)."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if finished_run_files(training_args.output_dir):
        logger.warning("Replacing the finished run in %s: training from the start, not from its checkpoints.",
                       training_args.output_dir)
        return None
    return last_complete_checkpoint(training_args.output_dir)


def check_run(script_args, training_args, model_args) -> str:
    """Every check that needs no model or data, before any work starts; returns the data source."""
    from ..data.loading import refuse_single_file
    from .best_on_membership import check_membership_options, refuse_reported_nonmembers
    from .best_on_validation import check_validation_options

    if model_args.model_name_or_path is None:
        raise GNMInputError("model_name_or_path: required (a local model folder or a Hub id)")
    source = script_args.data_dir or script_args.dataset_name
    if source is None:
        raise GNMInputError("data_dir / dataset_name: one of them is required")
    if script_args.data_dir and script_args.dataset_name:
        raise GNMInputError("data_dir and dataset_name: give only one")
    refuse_single_file(script_args.data_dir, "data_dir")  # it would be both the forget and the retain set
    check_validation_options(script_args)
    check_membership_options(script_args)
    refuse_reported_nonmembers(script_args)
    check_output_folder(training_args.output_dir, "output_dir")
    refuse_finished_output(training_args.output_dir, script_args.overwrite_output)
    check_hub_access(training_args)
    asked = training_args.resume_from_checkpoint
    if asked:
        problem = checkpoint_problem(asked) if os.path.isdir(asked) else "no such folder"
        if problem is not None:
            raise GNMInputError(f"resume_from_checkpoint: cannot resume from {asked} ({problem})")
    return source


REPLACED_RUN_DIR = ".replaced-run"


@contextlib.contextmanager
def replaced_run_kept(trainer, output_dir: str):
    """While a new model is saved over a finished run (`--overwrite_output true`), keep the old run's files aside
    and put them back if the save fails, so that a failed save never leaves a half-overwritten model."""
    keep = os.path.join(output_dir, REPLACED_RUN_DIR)
    moved = []
    if trainer.is_world_process_zero() and finished_run_files(output_dir):
        os.makedirs(keep, exist_ok=True)
        for name in sorted(os.listdir(output_dir)):
            if not name.startswith(".") and os.path.isfile(os.path.join(output_dir, name)):
                os.replace(os.path.join(output_dir, name), os.path.join(keep, name))
                moved.append(name)
    trainer.accelerator.wait_for_everyone()
    try:
        yield
    except BaseException:
        for name in moved:
            os.replace(os.path.join(keep, name), os.path.join(output_dir, name))
        raise
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(keep, ignore_errors=True)


def save_run(trainer, result) -> None:
    """The model first (with its manifest and card; uploaded with `push_to_hub`), then metrics and state: a write
    that fails later never costs the trained model, and a failed save over a finished run leaves that run."""
    output_dir = trainer.args.output_dir
    with replaced_run_kept(trainer, output_dir):
        trainer.save_model(output_dir)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()


def run_unlearning(script_args, training_args, model_args):
    """Check, load, train (from `resume_from_checkpoint`, else from the last complete checkpoint in output_dir when
    there is one), keep the step best on validation or on membership when asked, save; returns the trainer."""
    from ..data.loading import load_unlearning_data
    from ..gnm_trainer import GNMTrainer
    from .best_on_membership import keep_best_membership_step, membership_callback
    from .best_on_validation import keep_best_step, resume_best, validation_callback

    source = check_run(script_args, training_args, model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args)
    forget = load_unlearning_data(source, "forget", script_args.data_partition)
    needs_retain = {"gd", "klr", "rm"}.intersection(training_args.loss_terms)
    retain = load_unlearning_data(source, "retain", script_args.data_partition) if needs_retain else None
    validation = validation_callback(script_args, source, forget)
    membership = membership_callback(script_args, forget)
    keeper = validation or membership  # at most one: check_membership_options refuses both
    trainer = GNMTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=forget,
        retain_dataset=retain,
        negative_dataset=script_args.negatives_path,
        peft_config=build_peft_config(script_args, model_args),
        callbacks=[keeper] if keeper is not None else None,
    )
    resume_from = checkpoint_to_resume(training_args)
    if resume_from is not None:
        resume_best(keeper, training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume_from)
    keep_best_step(trainer, validation)
    keep_best_membership_step(trainer, membership)
    save_run(trainer, result)
    return trainer


def saved_files_block(output_dir: str) -> str:
    """Where the run's model, manifest and card are, for the end of `gnm unlearn`."""
    from ..manifest import MANIFEST_FILE
    from ..model_card import CARD_FILE

    model = "adapter" if os.path.isfile(os.path.join(output_dir, "adapter_config.json")) else "model"
    return (
        f"saved {model:<8} {output_dir}\n"
        f"      manifest {os.path.join(output_dir, MANIFEST_FILE)}\n"
        f"      card     {os.path.join(output_dir, CARD_FILE)}"
    )


def collapse_message(events: list[dict]) -> str:
    """One line for the collapse guard's stop (the last event)."""
    event = events[-1]
    threshold = "" if event.get("threshold") is None else f" > threshold {event['threshold']:.4g}"
    # The action reads "stopped", "stopped; no checkpoint ..." or "rolled back to ...".
    detail = event["action"].removeprefix("stopped").lstrip("; ")
    stopped = f"training stopped ({detail})" if detail else "training stopped"
    return (
        f"collapse guard: {event['metric']} = {event['value']:.4g}{threshold} after {event['step']} steps; {stopped}; "
        "the model saved is the one kept, and gnm_manifest.json records the event"
    )


def main(argv: list[str]) -> int:
    """`gnm unlearn`; returns the exit status (EXIT_COLLAPSED when the collapse guard stopped training)."""
    with parse_errors_in_one_line():
        script_args, training_args, model_args = parse_arguments(argv)
    trainer = run_unlearning(script_args, training_args, model_args)
    if not trainer.is_world_process_zero():
        return 0
    print(saved_files_block(training_args.output_dir))
    guard = trainer.collapse_guard
    if guard is not None and guard.events:  # after the progress bar has closed, on a line of its own
        print(f"gnm unlearn: {collapse_message(guard.events)}", file=sys.stderr)
        return EXIT_COLLAPSED
    return 0


@contextlib.contextmanager
def parse_errors_in_one_line():
    """While parsing, a flag error (`--max_steps abc`) is a GNMInputError: TrlParser would print its ~90-line usage
    before the one line that matters."""
    from trl import TrlParser

    def raise_input_error(parser, message):
        raise GNMInputError(f"{message}; `gnm unlearn --help` lists the options")

    own = TrlParser.__dict__.get("error")
    TrlParser.error = raise_input_error
    try:
        yield
    finally:
        if own is None:
            del TrlParser.error  # back to argparse's own
        else:
            TrlParser.error = own
