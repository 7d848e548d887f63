"""The one exception bad data raises, before any training starts."""
from __future__ import annotations


class DataError(ValueError):
    """Bad or unreadable data; the message names the file, row and column, and the fix."""


def where(source: str, row: int | None = None, column: str | None = None) -> str:
    """'file X, row N, column 'c'' (rows count from 0, as in the file's record order)."""
    parts = [f"{source}"]
    if row is not None:
        parts.append(f"row {row}")
    if column is not None:
        parts.append(f"column {column!r}")
    return ", ".join(parts)
