"""Datasets as ``.npz``: arrays ``x``, ``y`` and one ``group_<attribute>`` per group attribute, read by
:mod:`service.ingest.npz_archive` (sizes checked before allocation, object arrays refused)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import InvalidInput
from service.ingest.dataset import GroupColumn, ParsedDataset, check_attribute_name
from service.ingest.encoding import MAX_CLASSES, MISSING_TOKENS, checked_group, labels_from_class_indices, rows_list
from service.ingest.excerpts import LISTED, NAME_CHARS, listing
from service.ingest.limits import MAX_DECODED_BYTES
from service.ingest.npz_archive import read_arrays


def read_npz_dataset(path: Path, *, max_decoded_bytes: int = MAX_DECODED_BYTES) -> ParsedDataset:
    """Read an ``.npz`` with arrays ``x``, ``y`` and one or more ``group_<attribute>``."""
    arrays = read_arrays(Path(path), max_decoded_bytes, _check_array_names)
    x = _features(arrays["x"])
    n = x.shape[0]
    y, classes = _labels(arrays["y"], n)
    groups: dict[str, GroupColumn] = {}
    for name in sorted(name for name in arrays if name.startswith("group_")):
        column = arrays[name]
        if column.ndim != 1 or column.shape[0] != n:
            raise InvalidInput(
                f"{name} has shape {_shape_str(column.shape)}; it must be 1-D with one value per row of x ({n})"
            )
        groups[name[len("group_") :]] = _group_column(column, name)
    return ParsedDataset(x=x, y=y, classes=classes, groups=groups)


def _shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _check_array_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in ("x", "y") and not n.startswith("group_")]
    if unknown:
        raise InvalidInput(
            f"the .npz has arrays this service does not know: {listing(unknown)}; "
            "allowed names are x, y and group_<attribute> (one per group attribute)",
            errors=[{"key": n[:NAME_CHARS], "problem": "unexpected"} for n in unknown[:LISTED]],
        )
    for required in ("x", "y"):
        if required not in names:
            raise InvalidInput(
                f"the .npz has no array {required!r} (it has: {listing(names) or 'nothing'}); "
                "required are x (features), y (labels) and at least one group_<attribute>"
            )
    attributes = [n[len("group_") :] for n in names if n.startswith("group_")]
    if not attributes:
        raise InvalidInput(
            "the .npz has no group attribute: add at least one array named group_<attribute> "
            "(e.g. group_sex) with one value per row"
        )
    for attr in attributes:
        check_attribute_name(attr, f"rename the array group_{attr}")


def _features(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "b":
        raise InvalidInput("x is a boolean array; store features as numbers (e.g. x.astype(np.float32))")
    if x.dtype.kind not in "iuf":
        raise InvalidInput(f"x has dtype {x.dtype}; features must be integers or floats")
    if x.ndim < 2:
        raise InvalidInput(
            f"x has shape {_shape_str(x.shape)}; it must be [N, features...] with at least 2 dimensions "
            "(for a single feature use x.reshape(-1, 1))"
        )
    if x.shape[0] < 1:
        raise InvalidInput("x has no rows; the dataset must have at least one example")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(x, dtype=np.float32)
    flat = out.reshape(out.shape[0], -1)
    if not np.isfinite(flat).all():
        raise InvalidInput(_non_finite_features(x, flat))
    return out


def _non_finite_features(x: np.ndarray, flat: np.ndarray) -> str:
    """Where the NaN and infinite values of ``flat`` (``x`` as float32, one row per example) are."""
    nan_rows = np.flatnonzero(np.isnan(flat).any(axis=1))
    inf_rows = np.flatnonzero(np.isinf(flat).any(axis=1))
    n_nan = int(np.isnan(flat).sum())
    n_inf = int(np.isinf(flat).sum())
    src_inf = int(np.isinf(x).sum()) if x.dtype.kind == "f" else 0
    pieces = []
    if n_nan:
        pieces.append(f"{n_nan} NaN values (first rows, 0-based: {rows_list(nan_rows)})")
    if n_inf:
        note = f", {n_inf - src_inf} of them finite {x.dtype} values too large for float32" if n_inf > src_inf else ""
        pieces.append(f"{n_inf} infinite values{note} (first rows, 0-based: {rows_list(inf_rows)})")
    return "x has " + " and ".join(pieces) + "; every feature must be a finite number"


def _labels(y: np.ndarray, n: int) -> tuple[np.ndarray, list[str]]:
    if y.ndim != 1 or y.shape[0] != n:
        raise InvalidInput(f"y has shape {_shape_str(y.shape)}; it must be 1-D with one label per row of x ({n})")
    kind = y.dtype.kind
    if kind in "iub":
        return labels_from_class_indices(y.astype(np.int64), "y")
    if kind == "f":
        return labels_from_class_indices(_whole_float_labels(y), "y")
    if kind in "US":
        text = np.char.strip(_text(y, "y"))
        empty = np.flatnonzero(text == "")
        if len(empty):
            raise InvalidInput(
                f"y has {len(empty)} empty labels (rows, 0-based: {rows_list(empty)}); every row needs a label"
            )
        uniq, inverse = np.unique(text, return_inverse=True)
        if len(uniq) > MAX_CLASSES:
            raise InvalidInput(f"y has {len(uniq)} distinct labels, more than the {MAX_CLASSES} classes supported")
        return inverse.astype(np.int64).reshape(-1), [str(u) for u in uniq]
    raise InvalidInput(f"y has dtype {y.dtype}; labels must be non-negative integers or strings")


def _text(values: np.ndarray, what: str) -> np.ndarray:
    """A string array as str; numpy decodes a bytes array (dtype S) as ASCII."""
    try:
        return values.astype(str)
    except UnicodeDecodeError:
        raise InvalidInput(
            f"{what} holds bytes that are not ASCII text; store text as str (numpy dtype U), e.g. "
            "np.asarray(values, dtype=str)"
        ) from None


def _whole_float_labels(y: np.ndarray) -> np.ndarray:
    """Float labels that are class indices written as floats (1.0), as int64."""
    bad = np.flatnonzero(~np.isfinite(y))
    if len(bad):
        raise InvalidInput(f"y has {len(bad)} NaN or infinite labels (rows, 0-based: {rows_list(bad)})")
    frac = np.flatnonzero(y != np.floor(y))
    if len(frac):
        raise InvalidInput(
            f"y holds floats and {len(frac)} are not whole numbers (e.g. {float(y[frac[0]])!r} in row {int(frac[0])}, "
            "0-based); labels must be class indices or class names"
        )
    if y.size and float(y.max()) >= 2**62:
        raise InvalidInput(f"y's largest label is {float(y.max())!r}, far beyond a class index")
    return y.astype(np.int64)


def _group_column(arr: np.ndarray, what: str) -> GroupColumn:
    """Strings (blank, NaN, NA, None: no value), integers, booleans or floats (NaN: no value), coded
    in sorted order of their values."""
    kind = arr.dtype.kind
    if kind in "US":
        stripped = np.char.strip(_text(arr, what))
        missing = np.isin(np.char.lower(stripped), list(MISSING_TOKENS))
        return _coded(stripped, missing, str, what)
    if kind == "b":
        return _coded(arr, np.zeros(arr.shape[0], dtype=bool), lambda value: str(bool(value)), what)
    if kind in "iu":
        return _coded(arr, np.zeros(arr.shape[0], dtype=bool), lambda value: str(int(value)), what)
    if kind == "f":
        inf = np.isinf(arr)
        if inf.any():
            raise InvalidInput(
                f"{what} has {int(inf.sum())} infinite values (rows, 0-based: {rows_list(np.flatnonzero(inf))}); "
                "use NaN for a missing group value"
            )
        return _coded(arr, np.isnan(arr), _number_name, what)
    raise InvalidInput(
        f"{what} has dtype {arr.dtype}; a group attribute must hold integers or strings (NaN in a float "
        "array, or '', 'NA', 'None' in a string array, marks a missing value)"
    )


def _coded(values: np.ndarray, missing: np.ndarray, name: Callable[[Any], str], what: str) -> GroupColumn:
    """`name` turns one of the sorted unique values (a numpy scalar of the array's dtype) into the group's name."""
    uniq, inverse = np.unique(values[~missing], return_inverse=True)
    codes = np.full(values.shape[0], -1, dtype=np.int32)
    codes[~missing] = inverse.astype(np.int32).reshape(-1)
    return checked_group(GroupColumn(codes=codes, names=[name(u) for u in uniq]), what)


def _number_name(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)
