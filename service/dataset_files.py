"""The on-disk layout of a stored dataset, read and written here only: `x.npy` (float32 features), `y.npy`
(int64 labels) and one `group_<attribute>.npy` (int32 codes into the attribute's names, −1 = no value) per
attribute, in one directory. numpy only: the API writes it, workers and `make reproduce` memory-map it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import InvalidInput


@dataclass(frozen=True)
class DatasetFiles:
    """A stored dataset, memory-mapped: the page cache holds the one copy a worker reads."""

    x: np.ndarray
    y: np.ndarray
    groups: dict[str, np.ndarray]  # attribute → codes


def _write_npy(path: Path, array: np.ndarray) -> None:
    """Written to a temporary name, synced, then renamed: a crash never leaves a half-written array in place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_dataset_files(directory: Path, x: np.ndarray, y: np.ndarray, groups: Mapping[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _write_npy(directory / "x.npy", np.ascontiguousarray(x, dtype=np.float32))
    _write_npy(directory / "y.npy", np.ascontiguousarray(y, dtype=np.int64))
    for attribute, codes in groups.items():
        _write_npy(directory / f"group_{attribute}.npy", np.ascontiguousarray(codes, dtype=np.int32))


def stored_attributes(directory: Path) -> list[str]:
    return sorted(path.name[len("group_") : -len(".npy")] for path in directory.glob("group_*.npy"))


def open_dataset_files(directory: Path, attributes: Sequence[str]) -> DatasetFiles:
    available = stored_attributes(directory)
    absent = [attribute for attribute in attributes if attribute not in available]
    if absent:
        raise InvalidInput(
            f"the dataset has no group attribute {', '.join(map(repr, absent))}; it has: "
            f"{', '.join(available) or 'none'}"
        )

    def mapped(name: str) -> np.ndarray:
        return np.load(directory / name, mmap_mode="r", allow_pickle=False)

    return DatasetFiles(
        mapped("x.npy"), mapped("y.npy"), {attribute: mapped(f"group_{attribute}.npy") for attribute in attributes}
    )
