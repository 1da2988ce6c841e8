"""Negatives on disk and their check against a forget set.

A negatives file is written twice, atomically: `<stem>.jsonl` (readable, diffable) and `<stem>.parquet` (typed,
fast). `check_negatives` is the one place that decides whether a set of negatives belongs to a forget set: the
trainer and the generator both call it.
"""

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import GNMInputError, where
from ..io_utils import atomic_path, atomic_write_jsonl
from .schema import BACKENDS, NEGATIVE_FIELDS, completion_hash

SUFFIXES = (".jsonl", ".parquet")
REQUIRED_FIELDS = ("id", "level", "completion")
SHOWN = 5  # how many offending ids an error message lists


def negatives_stem(path: str | os.PathLike) -> str:
    """`path` without its `.jsonl` / `.parquet` suffix."""
    path = os.fspath(path)
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def negatives_paths(path: str | os.PathLike) -> tuple[str, str]:
    """The `.jsonl` and `.parquet` files that `write_negatives(rows, path)` writes."""
    stem = negatives_stem(path)
    return stem + ".jsonl", stem + ".parquet"


def _parquet_schema():
    import pyarrow as pa

    arrow_types = {str: pa.string(), int: pa.int64(), bool: pa.bool_()}
    return pa.schema([(name, arrow_types[kind]) for name, kind in NEGATIVE_FIELDS.items()])


def write_negatives(rows: list[dict[str, Any]], path: str | os.PathLike) -> tuple[str, str]:
    """Write `rows` to `<stem>.jsonl` and `<stem>.parquet` (each atomically); returns both paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = validate_negative_rows(rows, "negatives to write", require_provenance=True)
    ordered = [{name: row[name] for name in NEGATIVE_FIELDS} for row in rows]
    jsonl_path, parquet_path = negatives_paths(path)
    atomic_write_jsonl(jsonl_path, ordered)
    table = pa.Table.from_pylist(ordered, schema=_parquet_schema())
    with atomic_path(parquet_path) as temporary:
        pq.write_table(table, temporary)
    return jsonl_path, parquet_path


def validate_negative_rows(
    rows: Iterable[Mapping[str, Any]], source: str, require_provenance: bool = False
) -> list[dict[str, Any]]:
    """Every row has the required fields with the right type, a level >= 1 and a known backend; else a
    GNMInputError naming source, row and field.

    Negatives made by hand need only `id`, `level` and `completion`; the provenance fields (`source_hash`, backend,
    ...) are checked when present and required in files this package writes (`require_provenance`).
    """
    required = NEGATIVE_FIELDS if require_provenance else REQUIRED_FIELDS
    checked = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise GNMInputError(f"{where(source, index)}: expected a negative row object, got {type(row).__name__}")
        for name, kind in NEGATIVE_FIELDS.items():
            if name not in row:
                if name not in required:
                    continue
                raise GNMInputError(
                    f"{where(source, index, name)}: missing; a negative row has the fields {', '.join(required)}"
                )
            value = row[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise GNMInputError(
                    f"{where(source, index, name)}: expected {kind.__name__}, got {type(value).__name__} ({value!r})"
                )
        if not row["completion"].strip():
            raise GNMInputError(
                f"{where(source, index, 'completion')}: is empty; expected a non-empty negative completion"
            )
        if row["level"] < 1:
            raise GNMInputError(f"{where(source, index, 'level')}: expected a level >= 1, got {row['level']}")
        if "backend" in row and row["backend"] not in BACKENDS:
            raise GNMInputError(
                f"{where(source, index, 'backend')}: expected one of {BACKENDS}, got {row['backend']!r}"
            )
        checked.append(dict(row))
    return checked


def read_negatives(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Negative rows from a `.jsonl` or `.parquet` file (or a stem with either beside it), validated."""
    from ..data import read_records

    path = os.fspath(path)
    if not os.path.isfile(path) and not path.endswith(SUFFIXES):
        existing = [candidate for candidate in negatives_paths(path) if os.path.isfile(candidate)]
        path = existing[0] if existing else path
    if not os.path.isfile(path):
        raise GNMInputError(f"{path}: negatives file not found (expected .jsonl or .parquet written by gnm negatives)")
    return validate_negative_rows(read_records(path), path)


def _forget_completions(forget) -> list[tuple[str, str]]:
    """(id, true completion) of each forget row, from a normalised Dataset or rows."""
    if hasattr(forget, "column_names") and {"id", "completion"} <= set(forget.column_names):
        return list(zip(forget["id"], forget["completion"]))
    from .schema import as_rows

    return [(row["id"], row["completion"]) for row in as_rows(forget, "forget")]


def _first(items: Iterable[Any]) -> str:
    items = list(items)
    shown = ", ".join(repr(item) for item in items[:SHOWN])
    return shown + (", ..." if len(items) > SHOWN else "")


def check_negatives(
    negative_rows, forget_dataset, levels: int | None = None, source: str = "negatives"
) -> dict[str, list[str]]:
    """Check that negatives belong to a forget set and return {forget id: [completion of level 1, ..., K]}.

    Every forget id must have levels 1..K exactly once (K = `levels`, or the highest level present), no negative may
    name an unknown id, and each negative's `source_hash` must match its forget row's completion. `source` names
    the negatives (a file) in error messages.
    """
    rows = validate_negative_rows(negative_rows, source)
    forget = _forget_completions(forget_dataset)
    if not rows:
        raise GNMInputError(
            f"{source}: no negative rows; expected levels 1..K for each of the {len(forget)} forget rows"
        )
    expected_hash = {row_id: completion_hash(text) for row_id, text in forget}
    top_level = levels if levels is not None else max(row["level"] for row in rows)
    by_id: dict[str, dict[int, str]] = {}
    duplicates, out_of_range, unknown, wrong_hash = [], [], [], []
    for row in rows:
        row_id, level = row["id"], row["level"]
        if row_id not in expected_hash:
            unknown.append(row_id)
            continue
        if "source_hash" in row and row["source_hash"] != expected_hash[row_id]:
            wrong_hash.append(row_id)
        if level > top_level:
            out_of_range.append(f"{row_id} level {level}")
        elif level in by_id.setdefault(row_id, {}):
            duplicates.append(f"{row_id} level {level}")
        else:
            by_id[row_id][level] = row["completion"]
    if wrong_hash:
        wrong_ids = list(dict.fromkeys(wrong_hash))
        raise GNMInputError(
            f"{source}: negatives were generated for a different forget set: {len(wrong_ids)} ids have a "
            f"source_hash that does not match their forget row's completion (first: {_first(wrong_ids)}); "
            "regenerate them with gnm negatives"
        )
    unknown = list(dict.fromkeys(unknown))
    missing_ids = [row_id for row_id, _ in forget if row_id not in by_id]
    incomplete = [
        f"{row_id} (missing levels {sorted(set(range(1, top_level + 1)) - set(levels_of))})"
        for row_id, levels_of in by_id.items()
        if len(levels_of) != top_level
    ]
    problems = [
        (unknown, "ids in the negatives are not in the forget set"),
        (missing_ids, "forget ids have no negatives"),
        (incomplete, f"forget ids lack some of the levels 1..{top_level}"),
        (duplicates, "(id, level) pairs appear more than once"),
        (out_of_range, f"negatives have a level above {top_level}"),
    ]
    messages = [f"{len(items)} {what} (first: {_first(items)})" for items, what in problems if items]
    if messages:
        raise GNMInputError(f"{source} do not match the forget set: " + "; ".join(messages))
    return {row_id: [by_id[row_id][level] for level in range(1, top_level + 1)] for row_id, _ in forget}
