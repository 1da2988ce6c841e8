"""The `gnm` command line: one sub-command per stage of the pipeline.

`gnm unlearn` is parsed by TRL's `TrlParser` (YAML recipe + flags); the other sub-commands use argparse. Each
sub-command lives in its own module of this package and exposes `register(subparsers)`, which adds its parser and
sets `func` to the function that runs it.
"""

import importlib
import os
import sys

from ..errors import (
    EXIT_ENVIRONMENT,
    EXIT_INPUT,
    GNMInputError,
    describe_os_error,
    describe_out_of_memory,
    is_out_of_memory,
    one_line,
)
from ..io_utils import read_yaml_file

# Sub-commands parsed with argparse: name -> module in this package.
ARGPARSE_COMMANDS = {
    "negatives": "negatives",
    "evaluate": "evaluate",
    "make-target": "make_target",
    "demo": "demo",
}

USAGE = """usage: gnm <command> [options]

commands:
  unlearn      unlearn a model with GNMTrainer (a YAML recipe and/or flags)
  negatives    generate gradual negatives for a forget set
  evaluate     score a model with the SemEval-2025 Task 4 metric
  make-target  train a tiny model that memorises a LUME-format dataset
  demo         the whole pipeline end to end on the embedded synthetic default

`gnm <command> --help` shows each command's options and examples.
"""


def _build_argparse_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="gnm", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in ARGPARSE_COMMANDS.values():
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{module_name}":
                raise
            continue
        module.register(subparsers)
    for subparser in subparsers.choices.values():
        subparser.add_argument(
            "--config", metavar="YAML", help="a recipe: a YAML mapping of this command's options (flags override it)"
        )
    return parser, subparsers


def apply_recipe(subparser, argv: list[str]) -> None:
    """Make the options of a `--config` YAML recipe the defaults of `subparser`; an unknown key is an error.

    Keys are the option names with dashes or underscores (`max_new_tokens` or `max-new-tokens`).
    """
    if "--config" not in argv:
        return
    position = argv.index("--config")
    path = argv[position + 1] if position + 1 < len(argv) else None
    if path is None or not os.path.isfile(path):
        raise GNMInputError(f"--config: recipe file not found: {path}")
    recipe = read_yaml_file(path, "recipe") or {}
    if not isinstance(recipe, dict):
        raise GNMInputError(f"{path}: a recipe must be a YAML mapping of option names to values")
    actions = {action.dest: action for action in subparser._actions}
    unknown = sorted(key for key in recipe if key.replace("-", "_") not in actions or key in ("help", "config"))
    if unknown:
        raise GNMInputError(f"{path}: unknown key(s) {unknown} for `{subparser.prog}`; see `{subparser.prog} --help`")
    for key, value in recipe.items():
        action = actions[key.replace("-", "_")]
        action.default = value
        action.required = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        if argv[0] == "unlearn":
            from .unlearn import main as unlearn_main

            return int(unlearn_main(argv[1:]) or 0)
        parser, subparsers = _build_argparse_parser()
        if argv[0] in subparsers.choices:
            apply_recipe(subparsers.choices[argv[0]], argv)
        args = parser.parse_args(argv)
        result = args.func(args)
        return int(result or 0)
    except GNMInputError as error:
        print(f"gnm {argv[0]}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as error:  # the file system or the network, not the code: one line naming the path
        print(f"gnm {argv[0]}: error: {describe_os_error(error)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except RuntimeError as error:  # torch.OutOfMemoryError is the machine's limit; other RuntimeErrors are bugs
        if not is_out_of_memory(error):
            raise
        print(f"gnm {argv[0]}: error: {describe_out_of_memory(error)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print(f"gnm {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
