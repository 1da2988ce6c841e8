"""Data: loading any accepted source into the normalised form, and the collator that pairs forget examples."""

from .loading import (
    NORMALISED_COLUMNS,
    classify_kind,
    find_split_files,
    load_unlearning_data,
    load_unlearning_splits,
    read_records,
)

__all__ = [
    "NORMALISED_COLUMNS",
    "classify_kind",
    "find_split_files",
    "load_unlearning_data",
    "load_unlearning_splits",
    "read_records",
]
