"""Datasets as Parquet: the same form fields and meaning as a CSV upload (`label`, `groups`, optional `features`,
default every other column), read with pyarrow as data only.

Bounded before any column is read: the file has the CSV's byte cap, and the footer's declared rows × wanted columns
and their declared uncompressed size have caps of the same order (a CSV within its cap cannot hold more). Only the
wanted columns are read. Nothing in the file can run code: pyarrow is imported here, never pandas (no pandas
metadata is applied), and extension types, nested and binary columns are refused; pyarrow itself has not loaded
pickled Python extension types since 14.0.1 (CVE-2023-47248), and pyproject asks for a later one. pyarrow is
imported on the first Parquet upload only, so the web process does not carry it otherwise."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

import numpy as np

from service.errors import InvalidInput, PayloadTooLarge
from service.ingest.csv import MAX_CSV_BYTES
from service.ingest.dataset import GroupColumn, ParsedDataset, check_attribute_name
from service.ingest.encoding import MAX_CLASSES, MISSING_TOKENS, checked_group, labels_from_class_indices
from service.ingest.excerpts import cut, listing
from service.ingest.limits import MAX_COLUMNS

PARQUET_MAGIC = b"PAR1"
# A CSV cell is at least 2 bytes ("0,"): a CSV within its cap holds at most this many cells.
MAX_CELLS = MAX_CSV_BYTES // 2
MAX_UNCOMPRESSED_BYTES = 4 * MAX_CSV_BYTES
PANDAS_INDEX_PREFIX = "__index_level_"  # pandas' to_parquet(index=True) column: never a default feature


def is_parquet(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == PARQUET_MAGIC


def parquet_decoded_bytes(path: Path, max_decoded_bytes: int) -> int:
    """What reading the file holds at most, by its footer: every column's declared uncompressed bytes and a
    float32 copy of each cell; PayloadTooLarge over the cap."""
    metadata = _open(path).metadata
    cells = metadata.num_rows * metadata.num_columns
    declared = sum(
        metadata.row_group(g).column(c).total_uncompressed_size
        for g in range(metadata.num_row_groups)
        for c in range(metadata.num_columns)
    )
    decoded = declared + 4 * cells
    if decoded > max_decoded_bytes:
        raise PayloadTooLarge(
            f"the Parquet file may decode to {decoded} bytes ({cells} cells), more than the {max_decoded_bytes} "
            "bytes one dataset may take (setting max_decoded_bytes)"
        )
    return decoded


def read_parquet_dataset(
    path: Path, *, label: str, features: list[str] | None, groups: list[str], max_columns: int = MAX_COLUMNS
) -> ParsedDataset:
    import pyarrow as pa

    file = _open(path)
    names = list(file.schema_arrow.names)
    if len(names) > max_columns:
        raise InvalidInput(
            f"the Parquet file has {len(names)} columns, more than the {max_columns} a dataset may have "
            "(setting max_columns)"
        )
    wanted = _wanted_columns(names, label, features, groups)
    _check_bounds(file, [label, *groups, *wanted])
    try:
        table = file.read(columns=[label, *groups, *wanted], use_pandas_metadata=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InvalidInput(f"the Parquet file cannot be read ({cut(str(exc), 300)})") from None
    if table.num_rows == 0:
        raise InvalidInput("the Parquet file has no rows; the dataset needs at least one example")
    y, classes = _labels(table.column(label), f"the label column {label!r}")
    coded = {attr: _group(table.column(attr), f"group column {attr!r}") for attr in groups}
    x = np.stack([_feature(table.column(name), name) for name in wanted], axis=1)
    return ParsedDataset(x=x, y=y, classes=classes, groups=coded)


def _open(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq  # lazy: see the module docstring

    if (size := path.stat().st_size) > MAX_CSV_BYTES:
        raise InvalidInput(f"the Parquet file is {size} bytes, more than the {MAX_CSV_BYTES} a dataset file may have")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:  # ArrowInvalid, and OSError for a broken footer
        raise InvalidInput(
            f"the file starts like Parquet but cannot be read as Parquet ({cut(str(exc), 300)})"
        ) from None


def _wanted_columns(names: list[str], label: str, features: list[str] | None, groups: list[str]) -> list[str]:
    """The feature columns, once label, groups and features are checked against the file's columns."""
    if not groups:
        raise InvalidInput("name at least one group attribute column (groups); the audit compares groups")
    for attr in groups:
        check_attribute_name(attr, "rename the Parquet column")
    named = [label, *groups, *(features or [])]
    if len(set(named)) != len(named):
        raise InvalidInput("label, groups and features must name different columns, each once")
    if absent := [c for c in named if c not in names]:
        raise InvalidInput(
            f"the Parquet file has no column {listing(absent)}; available columns: {listing(names, 50)}",
            errors=[{"key": cut(c, 80), "problem": "missing_column"} for c in absent[:20]],
        )
    if len(set(names)) != len(names):
        raise InvalidInput("the Parquet file has more than one column of the same name")
    wanted = features or [n for n in names if n not in {label, *groups} and not n.startswith(PANDAS_INDEX_PREFIX)]
    if not wanted:
        raise InvalidInput("the Parquet file has no feature columns: every column is the label or a group attribute")
    return wanted


def _check_bounds(file, columns: list[str]) -> None:
    """The columns to read, by the footer alone: types that are data, declared cells and bytes within the caps."""
    import pyarrow as pa

    schema = file.schema_arrow
    for name in columns:
        kind = schema.field(name).type
        if isinstance(kind, pa.ExtensionType) or pa.types.is_nested(kind) or pa.types.is_binary(kind):
            raise InvalidInput(f"Parquet column {name!r} has type {kind}; dataset columns are numbers or strings")
    metadata = file.metadata
    if (cells := metadata.num_rows * len(columns)) > MAX_CELLS:
        raise InvalidInput(
            f"the Parquet file declares {metadata.num_rows} rows × {len(columns)} columns read = {cells} cells, more "
            f"than the {MAX_CELLS} a dataset may have"
        )
    positions = [schema.get_field_index(name) for name in columns]
    uncompressed = sum(
        metadata.row_group(g).column(c).total_uncompressed_size
        for g in range(metadata.num_row_groups)
        for c in positions
    )
    if uncompressed > MAX_UNCOMPRESSED_BYTES:
        raise InvalidInput(
            f"the Parquet file declares {uncompressed} bytes uncompressed in the columns read, more than the "
            f"{MAX_UNCOMPRESSED_BYTES} a dataset may have"
        )


def _texts(column) -> list[str | None]:
    return [None if v is None else str(v).strip() for v in column.to_pylist()]


def _labels(column, what: str) -> tuple[np.ndarray, list[str]]:
    """As in a CSV: class indices when every label is an integer >= 0, else the distinct texts in sorted order."""
    import pyarrow as pa

    if column.null_count:
        raise InvalidInput(f"{what} has {column.null_count} empty labels; every row needs a label")
    if pa.types.is_integer(column.type):
        return labels_from_class_indices(column.to_numpy().astype(np.int64), what)
    texts = [str(value).strip() for value in column.to_pylist()]
    if "" in texts:
        raise InvalidInput(f"{what} is empty in row {texts.index('')} (0-based); every row needs a label")
    classes = sorted(set(texts))
    if len(classes) > MAX_CLASSES:
        raise InvalidInput(f"{what} has {len(classes)} distinct values, more than the {MAX_CLASSES} classes supported")
    index = {text: i for i, text in enumerate(classes)}
    return np.array([index[t] for t in texts], dtype=np.int64), [str(c) for c in classes]


def _group(column, what: str) -> GroupColumn:
    """As in a CSV: numeric order when every present value is a number, else text order; nulls and the missing
    tokens (blank, NaN, NA, None) become -1."""
    texts = [None if t is None or t.lower() in MISSING_TOKENS else t for t in _texts(column)]
    present = sorted({t for t in texts if t is not None})
    with suppress(ValueError):  # not all numbers: text order
        present.sort(key=lambda t: (float(t), t))
    index = {text: i for i, text in enumerate(present)}
    codes = np.array([-1 if t is None else index[t] for t in texts], dtype=np.int32)
    return checked_group(GroupColumn(codes=codes, names=present), what)


def _feature(column, name: str) -> np.ndarray:
    import pyarrow as pa

    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
        raise InvalidInput(f"feature column {name!r} has type {column.type}; features must be numeric")
    if column.null_count:
        raise InvalidInput(f"feature column {name!r} has {column.null_count} empty cells; features must be numbers")
    with np.errstate(over="ignore"):
        values = column.to_numpy().astype(np.float32)
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InvalidInput(f"feature column {name!r} is not a finite float32 number in row {row} (0-based)")
    return values
