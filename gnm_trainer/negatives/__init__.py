"""Gradual negatives: for each forget row, K wrong completions from slightly (level 1) to fully wrong (level K).

- `perturb`: the model-free backend (typed facts and words swapped for wrong values of the same type).
- `llm`: the paper's backend (a generator LLM rewrites level k-1 further from the truth).
- `store`: reading and writing negatives files, and `check_negatives`, the one check that negatives belong to a
  forget set (used by the trainer too).
- `build`: `build_negatives`, the entry point behind `gnm negatives`: cache, resume, provenance.
"""

from .build import build_negatives, partial_path
from .llm import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, generate_llm_negatives, load_generator
from .perturb import build_pool, find_items, perturb_negatives
from .schema import BACKENDS, NEGATIVE_FIELDS, completion_hash, negative_row
from .store import check_negatives, negatives_paths, read_negatives, validate_negative_rows, write_negatives

__all__ = [
    "BACKENDS",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_TEMPLATE",
    "NEGATIVE_FIELDS",
    "build_negatives",
    "build_pool",
    "check_negatives",
    "completion_hash",
    "find_items",
    "generate_llm_negatives",
    "load_generator",
    "negative_row",
    "negatives_paths",
    "partial_path",
    "perturb_negatives",
    "read_negatives",
    "validate_negative_rows",
    "write_negatives",
]
