"""Loading a model, an adapter or a tokenizer (`from_pretrained`) with every fault as one line naming the path.

Local folders are passed as absolute paths, so that what is saved from them (an adapter's `base_model_name_or_path`)
still resolves from another working directory.
"""

import json
import os

from .data.loading import looks_like_local_path
from .errors import GNMInputError, first_line, is_out_of_memory, one_line

# What a bad model folder raises while loading (missing files, a truncated or corrupt weights file, a config
# without a field, no network for a Hub id); anything else is a bug and keeps its traceback.
LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, KeyError, EOFError)
try:
    from safetensors import SafetensorError

    LOAD_ERRORS += (SafetensorError,)
except ImportError:  # older safetensors: its error is not exported
    pass
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def from_pretrained(loader, name_or_path, what: str = "model", **kwargs):
    """`loader.from_pretrained(name_or_path, **kwargs)` with every loading fault as one GNMInputError naming `what`
    and the path. A local folder is passed as an absolute path, so that what is saved from it (an adapter's
    `base_model_name_or_path`) still resolves from another working directory."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        name = os.path.abspath(name)
    elif os.path.exists(name) or looks_like_local_path(name):
        reason = "a file, not a model folder" if os.path.exists(name) else "no such folder"
        raise GNMInputError(f"{what}: cannot load {name!r} ({reason})")
    if what.endswith("tokenizer") and os.path.isdir(name) and not any(
        os.path.isfile(os.path.join(name, file)) for file in TOKENIZER_FILES
    ):
        raise GNMInputError(
            f"{what}: cannot load {name!r} (no {' or '.join(TOKENIZER_FILES)} there); save the tokenizer with the "
            "model: tokenizer.save_pretrained(folder)"
        )
    try:
        return loader.from_pretrained(name, **kwargs)
    except LOAD_ERRORS as error:
        if is_out_of_memory(error):  # the machine's limit, not the folder's fault (the CLI says what to lower)
            raise
        raise GNMInputError(f"{what}: cannot load {name!r} ({type(error).__name__}: {first_line(error)})") from error


def adapter_base(adapter_dir: str) -> str | None:
    """The base model an adapter folder names, checked to exist when it is a local path; None for a full model."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
    except (ValueError, OSError) as error:
        raise GNMInputError(f"{config_path}: not a readable adapter config ({one_line(error)})") from error
    if base and not os.path.isdir(base) and looks_like_local_path(base):
        fix = "write the base model's path there" if os.path.isabs(base) else (
            f"it is relative to where the adapter was trained, not to {os.getcwd()}: run from there, or write the "
            "base model's absolute path there"
        )
        raise GNMInputError(f"{config_path}: base_model_name_or_path {base!r} is not a folder; {fix}")
    return base


def load_model_and_tokenizer(name_or_path, dtype=None):
    """A causal LM (or a PEFT adapter folder over its base model) and its tokenizer (the adapter's own, else the
    base model's), every fault one GNMInputError naming the path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(name_or_path)
    base = adapter_base(name) if os.path.isdir(name) else None
    if base is None:
        model = from_pretrained(AutoModelForCausalLM, name, "model", dtype=dtype)
    else:
        from peft import AutoPeftModelForCausalLM

        model = from_pretrained(AutoPeftModelForCausalLM, name, "adapter", dtype=dtype)
    has_tokenizer = base is None or any(os.path.isfile(os.path.join(name, file)) for file in TOKENIZER_FILES)
    tokenizer = from_pretrained(AutoTokenizer, name if has_tokenizer else base, "tokenizer")
    return model, tokenizer
