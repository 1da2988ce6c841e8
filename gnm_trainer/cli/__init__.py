"""The `gnm` command line: one sub-command per stage of the pipeline.

`gnm unlearn` is parsed by TRL's `TrlParser` (YAML recipe + flags); the other sub-commands use argparse. Each
sub-command lives in its own module of this package and exposes `register(subparsers)`, which adds its parser and
sets `func` to the function that runs it.
"""

import functools
import importlib
import os
import sys
import warnings

from ..errors import (
    EXIT_ENVIRONMENT,
    EXIT_INPUT,
    GNMInputError,
    describe_os_error,
    describe_out_of_memory,
    is_out_of_memory,
    one_line,
)
from .options import GNMArgumentParser, read_recipe, recipe_path

# Sub-commands parsed with argparse: name -> module in this package (`unlearn` is parsed by TrlParser).
ARGPARSE_COMMANDS = {
    "negatives": "negatives",
    "evaluate": "evaluate",
    "merge": "merge",
    "make-target": "make_target",
    "calibrate": "calibrate",
    "demo": "demo",
}
COMMANDS = ("unlearn", *ARGPARSE_COMMANDS)
# Libraries whose versions `gnm --version` prints beside ours (read from the installed metadata, not imported).
VERSION_LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")

USAGE = """usage: gnm <command> [options]

commands:
  unlearn      unlearn a model with GNMTrainer (a YAML recipe and/or flags)
  negatives    generate gradual negatives for a forget set
  evaluate     score a model with the SemEval-2025 Task 4 metric
  merge        merge LoRA adapters into one with TIES (ZJUKLAB's SemEval-2025 recipe)
  make-target  train a tiny model that memorises a LUME-format dataset
  calibrate    SimNPO's margin for the recommended recipe, from reference documents no reported figure uses
  demo         the whole pipeline end to end on the embedded synthetic default

`gnm <command> --help` shows each command's options and examples; `gnm --version` the versions in use.
Options are spelled with underscores, as in TRL (`--max_new_tokens`, and `max_new_tokens:` in a --config recipe);
the hyphenated spelling (`--max-new-tokens`) is accepted too.
"""


def version_text() -> str:
    """`gnm_trainer X.Y.Z` and, on a second line, Python's and the main libraries' versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in VERSION_LIBRARIES)
    return f"gnm_trainer {__version__}\npython {platform.python_version()}, {libraries}"


def _build_argparse_parser():
    import argparse

    parser = GNMArgumentParser(prog="gnm", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)  # sub-parsers are GNMArgumentParsers too
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

    Keys are the option names with underscores or dashes (`max_new_tokens` or `max-new-tokens`; see `options`).
    """
    path = recipe_path(argv)
    if path is None:
        return
    recipe = read_recipe(path)
    actions = {action.dest: action for action in subparser._actions}
    unknown = sorted(key for key in recipe if key not in actions or key in ("help", "config"))
    if unknown:
        raise GNMInputError(f"{path}: unknown key(s) {unknown} for `{subparser.prog}`; see `{subparser.prog} --help`")
    for key, value in recipe.items():
        actions[key].default = value
        actions[key].required = False


def unknown_command_message(command: str) -> str | None:
    """The one-line error for a first argument that is not a command (None when it is one)."""
    if command in COMMANDS:
        return None
    return f"gnm: error: unknown command '{command}'; choose from {', '.join(COMMANDS)} (see `gnm --help`)"


def quiet_unfixable_warnings() -> None:
    """Filter, narrowly, warnings that every run printed and that only another library can fix (the command line is
    the application, so it may; the library itself leaves the warning filters alone)."""
    # PEFT's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecates; our code
    # never calls it and the fix belongs to PEFT.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def exits_quietly_on_closed_pipe(function):
    """`gnm --help | head -1`: when the reader closes our stdout, stop quietly (as coreutils do), no traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            try:
                return function(*args, **kwargs)
            finally:
                sys.stdout.flush()  # inside the try: a closed pipe shows up here for short outputs
        except BrokenPipeError:
            # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe

    return wrapper


@exits_quietly_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(version_text())
        return 0
    unknown = unknown_command_message(argv[0])
    if unknown:
        print(unknown, file=sys.stderr)
        return 2
    quiet_unfixable_warnings()
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
