"""The generation entry point: make the negatives of a forget set once, resume after an interruption, reuse after.

`build_negatives` writes progress to `<stem>.partial.jsonl` (a provenance header line, then the negative rows of
each finished chunk of forget rows, flushed and fsynced), so a rerun generates only the rows not yet done. The
header records how the negatives are made (backend, levels, seed, generator, prompt, the forget and retain sets'
fingerprints); a rerun with other settings refuses to mix them unless `overwrite=True`. When every row is done the
final `.jsonl` and `.parquet` are written atomically, checked with `check_negatives`, and the partial file removed.
An existing final file with the same provenance is returned as it is (a cache hit).
"""

import contextlib
import json
import os
from typing import Any

from ..errors import GNMInputError
from ..io_utils import atomic_write_jsonl, check_output_folder, decode_utf8
from .llm import (
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TEMPLATE,
    check_template,
    distributed_state,
    generate_llm_negatives,
    load_generator,
)
from .perturb import FactPool, build_pool, perturb_negatives
from .schema import BACKENDS, PROVENANCE_FIELDS, as_rows, completion_hash, require_levels
from .store import (
    check_negatives,
    negatives_paths,
    negatives_stem,
    read_negatives,
    validate_negative_rows,
    write_negatives,
)


def partial_path(output: str | os.PathLike) -> str:
    """Where `build_negatives` keeps its progress for `output`."""
    return negatives_stem(output) + ".partial.jsonl"


def _fingerprint(rows: list[dict[str, Any]]) -> str:
    return completion_hash("\n".join(f"{row['id']}\t{completion_hash(row['completion'])}" for row in rows))


def _default_chunk_size(backend: str, batch_size: int, num_processes: int) -> int:
    return 256 if backend == "perturb" else max(32, 4 * batch_size * num_processes)


class _Processes:
    """Which process writes files, and a barrier; trivial outside a distributed launch."""

    def __init__(self):
        self.state = distributed_state()

    @property
    def count(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------
# The partial file
# ---------------------------------------------------------------------------------------------------------------


def _read_partial_text(path: str) -> str:
    """The partial file as text; a crash may have cut its last line inside a UTF-8 character (that line is dropped,
    like any cut-short last line), while a bad byte in a finished line is an error naming it."""
    with open(path, "rb") as handle:
        data = handle.read()
    cut = data.rfind(b"\n") + 1
    try:
        tail = data[cut:].decode("utf-8")
    except UnicodeDecodeError:
        tail = ""
    return decode_utf8(data[:cut], path) + tail


def _read_partial(path: str, levels: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(provenance header, rows of the forget ids whose K levels are all there). A last line cut short by a crash is
    ignored, and so are the rows of an id whose chunk was not finished; anything else unreadable is an error."""
    if not os.path.isfile(path):
        return None, []
    content = _read_partial_text(path)
    lines = content.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the line being written when the run stopped
                break
            raise GNMInputError(
                f"{path}, line {number}: invalid JSON ({error.msg}); delete the file or pass overwrite"
            ) from error
    if not records or not isinstance(records[0], dict) or "provenance" not in records[0]:
        raise GNMInputError(f"{path}, line 1: expected a provenance header; delete the file or pass overwrite")
    rows = validate_negative_rows(records[1:], path)
    levels_of: dict[str, list[int]] = {}
    for row in rows:
        levels_of.setdefault(row["id"], []).append(row["level"])
    complete = {row_id for row_id, found in levels_of.items() if sorted(found) == list(range(1, levels + 1))}
    return records[0]["provenance"], [row for row in rows if row["id"] in complete]


def _start_partial(path: str, provenance: dict[str, Any], done_rows: list[dict[str, Any]]) -> None:
    """(Re)write the partial file atomically: the header and the rows already done, nothing half-finished."""
    header = {"provenance": provenance}
    atomic_write_jsonl(path, [header, *done_rows])


def _append_rows(path: str, rows: list[dict[str, Any]]) -> None:
    """Append rows to the partial file and make them durable before going on."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = [key for key in wanted if found.get(key) != wanted[key]]
    return ", ".join(f"{key}: {found.get(key)!r} there, {wanted[key]!r} now" for key in keys)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def _generate_chunk(
    rows: list[dict[str, Any]], backend: str, levels: int, seed: int, pool: FactPool, llm: dict[str, Any]
) -> list[dict[str, Any]]:
    """The negatives of one chunk of forget rows (one call per chunk: the unit of progress)."""
    if backend == "perturb":
        return perturb_negatives(rows, levels=levels, seed=seed, pool=pool)
    return generate_llm_negatives(rows, levels=levels, seed=seed, pool=pool, **llm)


def _provenance(
    backend: str,
    levels: int,
    seed: int,
    forget: list[dict[str, Any]],
    retain: list[dict[str, Any]],
    generator_name: str,
    llm: dict[str, Any],
) -> dict[str, Any]:
    """Everything that decides the negatives' values (batch size does not: outputs do not depend on it)."""
    provenance = {"backend": backend, "levels": levels, "seed": seed, "generator": generator_name,
                  "prompt_template": llm.get("prompt_template", "")}  # fmt: skip
    provenance.update({key: llm[key] for key in ("system_prompt", "max_new_tokens", "do_sample", "max_retries") if llm})
    provenance.update(forget=_fingerprint(forget), retain=_fingerprint(retain))
    return provenance


def _cached(output: str, forget: list[dict[str, Any]], provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an existing final file, if it was made the same way for the same forget set."""
    rows = read_negatives(negatives_paths(output)[0])
    found = {key: rows[0][key] for key in PROVENANCE_FIELDS} if rows else {}
    found["levels"] = max((row["level"] for row in rows), default=0)
    wanted = {key: provenance[key] for key in (*PROVENANCE_FIELDS, "levels")}
    if found != wanted:
        raise GNMInputError(
            f"{negatives_paths(output)[0]}: exists and was made differently ({_differences(found, wanted)}); "
            "pass overwrite (--overwrite) to replace it, or choose another output"
        )
    check_negatives(rows, forget, provenance["levels"], source=negatives_paths(output)[0])
    return rows


def build_negatives(
    forget_rows,
    backend: str,
    levels: int,
    output: str | os.PathLike,
    retain_rows=None,
    seed: int = 0,
    generator=None,
    tokenizer=None,
    prompt_template: str = DEFAULT_TEMPLATE,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    max_retries: int = 2,
    overwrite: bool = False,
    chunk_size: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate (or resume, or reuse) the gradual negatives of a forget set and write them to `output`.

    Args:
        forget_rows, retain_rows: any source `load_unlearning_data` accepts (retain feeds the perturb pool).
        backend: "perturb" (model-free) or "llm" (needs `generator`: a model object with `tokenizer`, or a path).
        levels: K. output: `<stem>.jsonl` / `.parquet` (both are written).
        seed, prompt_template, system_prompt, batch_size, max_new_tokens, do_sample, max_retries: see the backends.
        overwrite: regenerate even when a final or partial file with other settings exists.
        chunk_size: forget rows per unit of progress (default 256 for perturb, 4 x batch x processes for llm).
        progress: show a tqdm progress bar (main process only).
    Returns: the negative rows in forget order, level 1..K per row.
    """
    from tqdm.auto import tqdm

    if backend not in BACKENDS:
        raise GNMInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    require_levels(levels)
    check_output_folder(os.path.dirname(os.path.abspath(os.fspath(output))), "output")
    forget = as_rows(forget_rows, "forget")
    retain = as_rows(retain_rows, "retain") if retain_rows is not None else []
    processes = _Processes()
    llm: dict[str, Any] = {}
    generator_name = ""
    if backend == "llm":
        if generator is None:
            raise GNMInputError("backend 'llm' needs a generator model (a path, a Hub id or a model object)")
        device = processes.state.device if processes.state is not None else None
        model, tokenizer, generator_name = load_generator(generator, tokenizer, device)
        llm = {"model": model, "tokenizer": tokenizer, "prompt_template": check_template(prompt_template),
               "system_prompt": system_prompt, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
               "do_sample": do_sample, "max_retries": max_retries}  # fmt: skip
    provenance = _provenance(backend, levels, seed, forget, retain, generator_name, llm)

    final_path, partial = negatives_paths(output)[0], partial_path(output)
    if os.path.isfile(final_path) and not overwrite:
        return _cached(output, forget, provenance)
    found, done_rows = _read_partial(partial, levels) if not overwrite else (None, [])
    if found is not None and found != provenance:
        raise GNMInputError(
            f"{partial}: an unfinished run with other settings ({_differences(found, provenance)}); rerun with the "
            "same settings to resume it, or pass overwrite (--overwrite) to start again"
        )
    processes.wait()  # every process has read the partial file before the main one writes to it
    if processes.is_main:
        _start_partial(partial, provenance, done_rows)
    done = {row["id"] for row in done_rows}
    pending = [row for row in forget if row["id"] not in done]
    if backend == "llm":  # similar lengths together: fewer padded positions per batch
        pending.sort(key=lambda row: -(len(row["prompt"]) + len(row["completion"])))
    pool = build_pool(row["completion"] for row in retain)
    size = chunk_size or _default_chunk_size(backend, batch_size, processes.count)
    rows = list(done_rows)
    with tqdm(total=len(forget), initial=len(done), desc=f"negatives ({backend})", unit="row",
              disable=not progress or not processes.is_main) as bar:  # fmt: skip
        for start in range(0, len(pending), size):
            chunk_rows = _generate_chunk(pending[start : start + size], backend, levels, seed, pool, llm)
            if processes.is_main:
                _append_rows(partial, chunk_rows)
            rows.extend(chunk_rows)
            bar.update(len(pending[start : start + size]))
    order = {row["id"]: index for index, row in enumerate(forget)}
    rows.sort(key=lambda row: (order[row["id"]], row["level"]))
    check_negatives(rows, forget, levels, source=partial)
    if processes.is_main:
        write_negatives(rows, output)
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
    processes.wait()
    return rows


def load_sources(forget: str, retain: str | None = None, partition: str = "train"):
    """(forget rows, retain rows or None) for `gnm negatives`: `forget` is a data folder or a file; `retain`
    defaults to the folder's retain split when `forget` is a folder (None when it has none)."""
    from ..data import load_unlearning_data

    forget_rows = load_unlearning_data(forget, "forget", partition)
    if retain is not None:
        return forget_rows, load_unlearning_data(retain, "retain", partition)
    if os.path.isdir(forget):
        try:
            return forget_rows, load_unlearning_data(forget, "retain", partition)
        except GNMInputError:
            return forget_rows, None  # no retain split there: replacement values are synthesised
    return forget_rows, None
