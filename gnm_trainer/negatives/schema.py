"""The negative row: one dict per (forget id, level), with the provenance that makes a negatives file reusable.

A negatives file holds, for every forget row and every level 1..K, the row's id, the level, the negative completion,
the hash of the true completion it was made from (so that a file cannot silently be paired with another forget set)
and how it was made (backend, generator, prompt template, seed, and whether an LLM output fell back to the
model-free backend).
"""

import hashlib
from typing import Any

BACKENDS = ("perturb", "llm")
# Field -> accepted Python type(s), in the order rows are written.
NEGATIVE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "level": int,
    "completion": str,
    "source_hash": str,
    "backend": str,
    "generator": str,
    "prompt_template": str,
    "seed": int,
    "fallback": bool,
}
# The fields that say how a file was made; a resumed or reused run must agree on all of them.
PROVENANCE_FIELDS = ("backend", "generator", "prompt_template", "seed")
HASH_CHARS = 16


def completion_hash(text: str) -> str:
    """The first 16 hex digits of the SHA-256 of a true completion: the one hash used to tie negatives to it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_CHARS]


def negative_row(
    forget_row: dict[str, Any],
    level: int,
    completion: str,
    backend: str,
    seed: int,
    generator: str = "",
    prompt_template: str = "",
    fallback: bool = False,
) -> dict[str, Any]:
    """One negative row for `forget_row` (a normalised row with `id` and `completion`) at `level`."""
    return {
        "id": str(forget_row["id"]),
        "level": int(level),
        "completion": completion,
        "source_hash": completion_hash(forget_row["completion"]),
        "backend": backend,
        "generator": generator,
        "prompt_template": prompt_template,
        "seed": int(seed),
        "fallback": bool(fallback),
    }


def row_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed derived from the base seed and a row's identity, independent of batching and process count."""
    key = ":".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") >> 1


def require_levels(levels: Any) -> int:
    """K as an int >= 1, or a GNMInputError."""
    from ..errors import GNMInputError

    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise GNMInputError(f"levels must be an integer >= 1 (the number of gradual negatives per row), got {levels!r}")
    return levels


def as_rows(source: Any, split: str = "forget") -> list[dict[str, Any]]:
    """Normalised rows (id, prompt, completion, ...) as a list of dicts, from any source `load_unlearning_data`
    accepts (rows already normalised pass through unchanged)."""
    from ..data import load_unlearning_data

    return load_unlearning_data(source, split).to_list()
