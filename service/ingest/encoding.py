"""Label and group coding shared by the .npz and CSV readers: labels become class indices 0..C-1,
group values become int32 codes into a list of names (-1 where a row has no value)."""

from __future__ import annotations

import numpy as np

from service.errors import InvalidInput
from service.ingest.dataset import GroupColumn

MAX_CLASSES = 10_000
MAX_GROUP_VALUES = 10_000
MISSING_TOKENS = frozenset({"", "nan", "na", "none"})  # compared lower-cased and stripped


def rows_list(indices: np.ndarray, *, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (", ..." if len(indices) > limit else "")


def labels_from_class_indices(values: np.ndarray, what: str) -> tuple[np.ndarray, list[str]]:
    """Integer labels as they are (class indices 0..max), with classes named "0".."max"."""
    if values.size and values.min() < 0:
        bad = np.flatnonzero(values < 0)
        raise InvalidInput(
            f"{what} has {len(bad)} negative labels (rows, 0-based: {rows_list(bad)}); integer labels are class "
            "indices 0..C-1, or store the labels as strings"
        )
    top = int(values.max()) if values.size else -1
    check_largest_class_index(top, what)
    return values.astype(np.int64), [str(i) for i in range(top + 1)]


def check_largest_class_index(top: int, what: str) -> None:
    if top + 1 > MAX_CLASSES:
        raise InvalidInput(
            f"the largest label in {what} is {top}; integer labels are class indices 0..max, and more than "
            f"{MAX_CLASSES} classes are not supported. If the labels are identifiers, store them as strings"
        )


def checked_group(col: GroupColumn, what: str) -> GroupColumn:
    if not col.names:
        raise InvalidInput(f"{what} has no values: all {len(col.codes)} rows are missing")
    if len(col.names) > MAX_GROUP_VALUES:
        raise InvalidInput(
            f"{what} has {len(col.names)} distinct values, more than the {MAX_GROUP_VALUES} allowed; "
            "a group attribute should be a category (e.g. sex, age band), not an identifier"
        )
    return col
