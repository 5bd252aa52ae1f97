"""A dataset as the readers hand it over (:class:`ParsedDataset`), and its storage: the files are
written by :mod:`service.dataset_files`, the summary recorded with the dataset is computed here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.dataset_files import write_dataset_files
from service.errors import InvalidInput
from service.ingest.excerpts import quoted

# An attribute names a stored file (group_<attribute>.npy), so it is kept to a safe alphabet.
ATTRIBUTE_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


@dataclass
class GroupColumn:
    codes: np.ndarray  # int32, -1 = missing
    names: list[str]  # names[code]


@dataclass
class ParsedDataset:
    x: np.ndarray  # float32 [N, ...]
    y: np.ndarray  # int64 class codes 0..C-1
    classes: list[str]
    groups: dict[str, GroupColumn]


def check_attribute_name(attr: str, fix: str) -> None:
    if not ATTRIBUTE_RE.match(attr):
        raise InvalidInput(
            f"{quoted(attr)} cannot be a group attribute name: names must be 1-64 letters, digits or underscores; {fix}"
        )


def check_no_nul(texts: list[str], what: str) -> None:
    """Label and group texts are stored and reported as text, which cannot hold NUL (PostgreSQL refuses it)."""
    if bad := next((text for text in texts if "\x00" in text), None):
        raise InvalidInput(f"{what} contains a NUL character ({bad!r}); remove NUL bytes from the file's text cells")


def save_dataset(ds: ParsedDataset, directory: Path) -> dict:
    """Store ``ds`` under ``directory``; return its summary (rows, feature shape, classes, and per group
    attribute the value names, their sizes and the number of rows without a value)."""
    for attr in ds.groups:
        check_attribute_name(attr, "rename the attribute")
    check_no_nul(ds.classes, "a label")
    for attr, col in ds.groups.items():
        check_no_nul(col.names, f"a value of group attribute {attr!r}")
    write_dataset_files(Path(directory), ds.x, ds.y, {attr: col.codes for attr, col in ds.groups.items()})
    return {
        "rows": int(ds.x.shape[0]),
        "feature_shape": [int(d) for d in ds.x.shape[1:]],
        "classes": list(ds.classes),
        "groups": {attr: _group_summary(col) for attr, col in ds.groups.items()},
    }


def _group_summary(col: GroupColumn) -> dict:
    codes = np.asarray(col.codes)
    sizes = np.bincount(codes[codes >= 0], minlength=len(col.names))[: len(col.names)]
    return {"names": list(col.names), "sizes": [int(s) for s in sizes], "missing": int((codes < 0).sum())}
