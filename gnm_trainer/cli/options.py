"""One spelling for the options of every `gnm` command: TRL's underscores, flags and YAML keys alike.

`gnm unlearn` is parsed by TRL's `TrlParser`, whose options are dataclass field names (`--max_steps`,
`max_steps:`); the other commands follow it (`--max_new_tokens`, `max_new_tokens:`). The hyphenated spelling
(`--max-new-tokens`, `max-new-tokens:`) is accepted everywhere as an alias, as `HfArgumentParser` accepts it for flags.
A recipe that spells one option both ways is an error.

Nothing here imports transformers or TRL, so `gnm --help` stays fast.
"""

import argparse
import os
from collections.abc import Mapping
from typing import Any

from ..errors import GNMInputError


def option_key(name: str) -> str:
    """The canonical (underscore) name of a flag or recipe key: `--max-new-tokens` -> `max_new_tokens`."""
    return name.lstrip("-").replace("-", "_")


def flag_spellings(option_string: str) -> list[str]:
    """`--max-new-tokens` or `--max_new_tokens` -> `["--max_new_tokens", "--max-new-tokens"]` (underscores first)."""
    if not option_string.startswith("--"):
        return [option_string]
    key = option_key(option_string)
    return list(dict.fromkeys([f"--{key}", f"--{key.replace('_', '-')}"]))


class GNMArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose long options take the underscore spelling as their name (and `dest`) and accept
    the hyphenated one as an alias, whichever of the two the caller wrote."""

    def add_argument(self, *name_or_flags, **kwargs):
        if name_or_flags and all(name.startswith("-") for name in name_or_flags):
            spellings = [spelling for name in name_or_flags for spelling in flag_spellings(name)]
            name_or_flags = tuple(dict.fromkeys(spellings))
        return super().add_argument(*name_or_flags, **kwargs)


def normalise_recipe_keys(recipe: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The recipe with every key in its underscore spelling; a key given in both spellings is an error."""
    normalised: dict[str, Any] = {}
    spelled_as: dict[str, str] = {}
    for key, value in recipe.items():
        canonical = option_key(str(key))
        if canonical in normalised:
            raise GNMInputError(
                f"{path}: keys '{spelled_as[canonical]}' and '{key}' name the same option; keep one ('{canonical}')"
            )
        normalised[canonical], spelled_as[canonical] = value, str(key)
    return normalised


def recipe_path(argv: list[str]) -> str | None:
    """The path given to `--config` in `argv` (None without `--config`); a missing file is an error."""
    if "--config" not in argv:
        return None
    position = argv.index("--config")
    path = argv[position + 1] if position + 1 < len(argv) else None
    if path is None or not os.path.isfile(path):
        raise GNMInputError(f"--config: recipe file not found: {path}")
    return path


def read_recipe(path: str) -> dict[str, Any]:
    """A recipe file as a mapping with underscore keys (see `normalise_recipe_keys`)."""
    from ..io_utils import read_yaml_file

    recipe = read_yaml_file(path, "recipe") or {}
    if not isinstance(recipe, dict):
        raise GNMInputError(f"{path}: a recipe must be a YAML mapping of option names to values")
    return normalise_recipe_keys(recipe, path)
