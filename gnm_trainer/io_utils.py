"""Atomic output: every file the package writes appears whole or not at all.

Each writer goes to a temporary name in the destination's own folder (same filesystem), then `os.replace`s it over
the destination, so an interrupted run never leaves a truncated file that looks finished.
"""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any


def _sibling_name(path: str, suffix: str) -> str:
    """A fresh hidden name in `path`'s folder. Not `tempfile.mkstemp`: its 0600 mode would stick to the output."""
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{suffix}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on failure removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = _sibling_name(path, "tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write one JSON object per line to `path` atomically."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` (an existing folder there is
    removed only after the new one is in place), on failure it is removed."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temporary = _sibling_name(path, "tmp")
    os.mkdir(temporary)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if os.path.lexists(path):
        retired = _sibling_name(path, "old")
        os.replace(path, retired)
        os.replace(temporary, path)
        if os.path.isdir(retired):
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.remove(retired)
    else:
        os.replace(temporary, path)


@contextlib.contextmanager
def atomic_files_into(directory: str | os.PathLike) -> Iterator[str]:
    """Yield an empty hidden folder inside `directory`; on success every file written there is moved into
    `directory` with `os.replace` (each file appears whole), on failure nothing is moved. For an output folder that
    must stay in place (one a caller created, possibly a mount point), where `atomic_directory` cannot swap it."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    staging = _sibling_name(os.path.join(directory, "files"), "staging")
    os.mkdir(staging)
    try:
        yield staging
        for folder, _, names in os.walk(staging):
            destination = os.path.join(directory, os.path.relpath(folder, staging))
            os.makedirs(destination, exist_ok=True)
            for name in names:
                os.replace(os.path.join(folder, name), os.path.join(destination, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json_file(path: str, what: str) -> Any:
    """Parse a JSON file; a missing file or invalid JSON is a GNMInputError naming the file and `what` it should be."""
    from .errors import GNMInputError

    if not os.path.isfile(path):
        raise GNMInputError(f"{path}: {what} not found")
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as error:
        raise GNMInputError(f"{path}: invalid JSON ({error})") from error


def decode_utf8(data: bytes, path: str, line_number: int | None = None) -> str:
    """`data` (the file `path`, or its line `line_number`) as UTF-8 text; otherwise a GNMInputError naming the
    file, the line and the offending byte."""
    from .errors import GNMInputError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if line_number is None:
            line_number = data.count(b"\n", 0, error.start) + 1
        raise GNMInputError(
            f"{path}, line {line_number}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from error


def read_text_file(path: str) -> str:
    """The whole of a UTF-8 text file (the error for other encodings names the line)."""
    with open(path, "rb") as handle:
        return decode_utf8(handle.read(), path)


def read_yaml_file(path: str, what: str) -> Any:
    """Parse a YAML file; invalid YAML or non-UTF-8 text is a GNMInputError naming the file, line and column."""
    import yaml

    from .errors import GNMInputError, one_line

    if not os.path.isfile(path):
        raise GNMInputError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(read_text_file(path))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or error
        raise GNMInputError(f"{path}{at}: invalid YAML in the {what} ({one_line(problem)})") from error


def check_output_folder(path: str | os.PathLike, option: str = "output_dir") -> None:
    """Check, before any work starts, that `path` is (or can become) a writable folder, creating nothing.

    A file at `path` (or above it) is a GNMInputError; a folder that cannot be written (read-only file system, no
    permission) is an OSError naming the folder.
    """
    from .errors import GNMInputError

    path = os.path.abspath(os.fspath(path))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == path else f" ({existing} is a file, so no folder can be made below it)"
        raise GNMInputError(f"{option}: {path} is not a folder{where}; expected a folder to write into")
    probe = _sibling_name(os.path.join(existing, "write-check"), "probe")
    try:
        with open(probe, "w", encoding="utf-8"):
            pass
    except OSError as error:
        raise OSError(error.errno, f"{option} cannot be written here ({error.strerror})", existing) from error
    os.remove(probe)
