"""A tree of plain data in one `.npz`, never a pickle: frozen dataclasses, lists, tuples, dicts with str keys,
numpy arrays and scalars, str, int, float, bool and None. Arrays go in as npz entries (loaded with
allow_pickle=False, dtype and shape exact); the shape of the tree goes in as one JSON entry.

Generic over dataclass fields: a dataclass is written as its class's import path and its init fields, so a
field added to ModelDiagnostics or GroupCurvature is stored with no change here. On reading, only dataclasses
of this project's own packages are built (a file names classes; it never picks arbitrary code to run)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.errors import EngineError

STRUCTURE_ENTRY = "__structure__"
# Packages whose dataclasses a file may name; anything else is refused on reading.
TRUSTED_PACKAGES = ("worker", "results")


class TreeEncoder:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def _array(self, array: np.ndarray) -> str:
        if array.dtype.hasobject:
            raise EngineError(f"cannot store an array of Python objects (dtype {array.dtype}) without pickling")
        key = f"a{len(self.arrays)}"
        self.arrays[key] = np.asarray(array)  # a memmap is written as its values
        return key

    def encode(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.generic):  # before int/float: np.float64 is a float, and must stay np.float64
            return {"t": "scalar", "key": self._array(np.asarray(value))}
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, np.ndarray):
            return {"t": "array", "key": self._array(value)}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            cls = type(value)
            fields = {f.name: self.encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
            return {"t": "dataclass", "type": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
        if isinstance(value, (list, tuple)):
            return {"t": type(value).__name__, "items": [self.encode(item) for item in value]}
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise EngineError(f"cannot store a dict with non-str keys: {list(value)[:5]}")
            return {"t": "dict", "items": {key: self.encode(item) for key, item in value.items()}}
        raise EngineError(f"cannot store a {type(value).__name__} as data")


def trusted_dataclass(path: str, trusted: tuple[str, ...]) -> type:
    module_name, _, qualname = path.partition(":")
    if module_name.split(".")[0] not in trusted:
        raise EngineError(f"the stored tree names {path}, outside {trusted}; refusing to build it")
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not (isinstance(found, type) and dataclasses.is_dataclass(found)):
        raise EngineError(f"the stored tree names {path}, which is not a dataclass")
    return found


def decode(node: Any, arrays: dict[str, np.ndarray], trusted: tuple[str, ...]) -> Any:
    if not isinstance(node, dict):
        return node
    kind = node["t"]
    if kind == "array":
        return arrays[node["key"]]
    if kind == "scalar":
        return arrays[node["key"]][()]
    if kind in ("list", "tuple"):
        items = [decode(item, arrays, trusted) for item in node["items"]]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {key: decode(item, arrays, trusted) for key, item in node["items"].items()}
    if kind == "dataclass":
        fields = {name: decode(value, arrays, trusted) for name, value in node["fields"].items()}
        return trusted_dataclass(node["type"], trusted)(**fields)
    raise EngineError(f"unknown node kind {kind!r} in a stored tree")


def write_tree(path: Path, tree: Any) -> None:
    """Write atomically (a temporary name, then a rename): a reader never sees half a file."""
    encoder = TreeEncoder()
    structure = json.dumps(encoder.encode(tree)).encode()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with partial.open("wb") as handle:
        # Typed Any: numpy's stubs read **arrays as its allow_pickle flag (np.savez never pickles numeric arrays).
        entries: dict[str, Any] = {**encoder.arrays, STRUCTURE_ENTRY: np.frombuffer(structure, dtype=np.uint8)}
        np.savez(handle, **entries)
    os.replace(partial, path)


def read_tree(path: Path, trusted: tuple[str, ...] = TRUSTED_PACKAGES) -> Any:
    """The tree `write_tree` wrote; dataclasses are built only from the packages in `trusted`."""
    with np.load(path, allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
    structure = json.loads(arrays.pop(STRUCTURE_ENTRY).tobytes())
    return decode(structure, arrays, trusted)
