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
