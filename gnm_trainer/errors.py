"""Errors a user can act on.

Every problem with the user's input (a file, a row, a field, a setting) is raised as `GNMInputError`, whose message
names where the problem is and what was expected. The `gnm` command line prints these without a traceback and exits
with status 2; anything else is a bug and keeps its traceback.
"""


class GNMInputError(ValueError):
    """Bad user input: a file, row, field or setting that is missing or wrong."""


def where(source: str | None = None, row: int | str | None = None, field: str | None = None) -> str:
    """Format the location of a problem as 'file F, row R, field X' (only the parts that are known)."""
    parts = []
    if source is not None:
        parts.append(f"{source}")
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts) if parts else "input"


# Exit statuses of the `gnm` command line (documented in docs/troubleshooting.md).
EXIT_ENVIRONMENT = 1  # a file system or network fault (a path that cannot be written, a full disk, no Hub)
EXIT_INPUT = 2  # a GNMInputError
EXIT_COLLAPSED = 3  # `gnm unlearn`: the collapse guard stopped training


def one_line(text: str) -> str:
    """`text` with its line breaks folded into spaces: the CLI prints every error on one line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (library errors often add pages of advice)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def describe_os_error(error: OSError) -> str:
    """'path: reason' for a file-system error (both paths of a rename), else the error's own text."""
    reason = error.strerror or str(error)
    paths = [name for name in (error.filename, error.filename2) if name is not None]
    return one_line(f"{' -> '.join(map(str, paths))}: {reason}" if paths else reason)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is `torch.OutOfMemoryError` (checked by name: this module does not import torch)."""
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__)


def describe_out_of_memory(error: BaseException) -> str:
    """One line for an accelerator out-of-memory error, with what to lower."""
    return (
        f"out of accelerator memory ({first_line(error).split('. ')[0]}); lower the batch size (per_device_train_batch_size, "
        "--batch-size) or max_length, or use gradient_accumulation_steps, LoRA or gradient_checkpointing"
    )
