"""`gnm unlearn --help`: our options first, in groups; `--help_all` also lists every TrainingArguments/ModelConfig one.

The parser is TRL's `TrlParser` over (`UnlearnScriptArguments`, `GNMConfig`, `ModelConfig`): over 300 options, most
of them transformers' `TrainingArguments`. Every option is parsed either way; only the help shows fewer.
"""

import argparse
import dataclasses

HELP_ALL_FLAGS = ("--help_all", "--help-all")
USAGE = "gnm unlearn [--config RECIPE.yaml] [--OPTION VALUE ...]"
MODEL_FIELDS = ("model_name_or_path", "model_revision", "dtype", "attn_implementation")
PEFT_FIELDS = (
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "use_rslora",
    "use_dora",
)
# The TrainingArguments a recipe sets most often (GNMConfig changes the defaults of learning_rate and logging_steps).
TRAINING_FIELDS = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "logging_steps", "save_strategy", "save_steps",
    "eval_strategy", "seed", "bf16", "activation_checkpointing", "report_to", "push_to_hub", "hub_model_id",
)


class RawDescriptionDefaultsFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the examples of the description as written, and show each option's default (as HfArgumentParser does)."""


def short_help_groups(script_type, config_type) -> dict[str, tuple[str, ...]]:
    """Title -> option names of the short help: the script's (data, PEFT method, validation), GNMConfig's own, the
    model and PEFT ones, then the most used training ones."""
    from transformers import TrainingArguments

    inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
    own = tuple(field.name for field in dataclasses.fields(config_type) if field.name not in inherited)
    return {
        "data, PEFT method and validation": tuple(field.name for field in dataclasses.fields(script_type)),
        "unlearning (GNMConfig)": own,
        "model (TRL ModelConfig)": MODEL_FIELDS,
        "PEFT (TRL ModelConfig; with --use_peft)": PEFT_FIELDS,
        "training (transformers TrainingArguments; the most used, see --help_all for all)": TRAINING_FIELDS,
    }


def describe_negated_flags(parser: argparse.ArgumentParser) -> None:
    """HfArgumentParser gives `--no_X` (added for a bool field X that defaults to True) X's own help and a default of
    False, which read as the opposite of what the flag does; say what it does instead."""
    for action in parser._actions:
        negated = [name for name in action.option_strings if name.startswith("--no_")]
        if negated and isinstance(action, argparse._StoreFalseAction):
            action.help = f"Turn {action.dest} off (the same as --{action.dest} false)."
            # Only help reads this default: the `--X` action (added first) sets the value when neither flag is given.
            action.default = argparse.SUPPRESS


class HelpAllAction(argparse.Action):
    """`--help_all`: print the help of a parser that shows every option, then exit (like `--help`)."""

    def __init__(self, option_strings, full_parser, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)
        self.full_parser = full_parser

    def __call__(self, parser, namespace, values, option_string=None):
        self.full_parser().print_help()
        parser.exit()


def show_short_help(parser: argparse.ArgumentParser, groups: dict[str, tuple[str, ...]], full_parser) -> None:
    """Group the options of `groups` under their titles and hide the others from `--help` (they still parse);
    add `--help_all`, which prints `full_parser()`'s help."""
    parser.add_argument(
        *HELP_ALL_FLAGS, action=HelpAllAction, full_parser=full_parser,
        help="show every option, including all of TrainingArguments and ModelConfig, and exit",
    )
    actions_of: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        actions_of.setdefault(action.dest, []).append(action)  # `--X` and `--no_X` share a dest
    grouped = set()
    # argparse has no public way to move an option into a group once added: fill the groups' action lists.
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            for action in actions_of.get(name, []):
                group._group_actions.append(action)
                grouped.add(id(action))
    parser._optionals._group_actions[:] = [
        action for action in parser._optionals._group_actions if id(action) not in grouped
    ]
    for action in parser._optionals._group_actions:
        if action.dest not in ("help",) and action.option_strings[0] not in HELP_ALL_FLAGS:
            action.help = argparse.SUPPRESS
