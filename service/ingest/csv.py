"""Datasets as CSV: UTF-8 with a header row, read in one streaming pass with the standard library's
``csv``. Feature cells are parsed to float32 in chunks of rows; label and group texts are interned
as they stream and coded once the pass is over. Rows are numbered as in a spreadsheet: the header is
row 1, and blank lines count."""

from __future__ import annotations

import csv
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from service.errors import InvalidInput, PayloadTooLarge
from service.ingest.dataset import GroupColumn, ParsedDataset, check_attribute_name
from service.ingest.encoding import (
    MAX_CLASSES,
    MISSING_TOKENS,
    check_largest_class_index,
    checked_group,
    labels_from_class_indices,
)
from service.ingest.excerpts import LISTED, NAME_CHARS, listing, quoted
from service.ingest.limits import MAX_COLUMNS

MAX_CSV_BYTES = 100_000_000
_CSV_CHUNK_ROWS = 8192
# Room for commas inside quoted cells before a line counts as having too many columns.
_COMMAS_PER_COLUMN = 4


def csv_decoded_bytes(path: Path, max_decoded_bytes: int) -> int:
    """What reading the CSV holds at most: twice its size, since every feature cell takes at least two bytes
    of text ("0,") and becomes a 4-byte float32 (label and group codes likewise); PayloadTooLarge over the cap."""
    decoded = 2 * Path(path).stat().st_size
    if decoded > max_decoded_bytes:
        raise PayloadTooLarge(
            f"the CSV may decode to {decoded} bytes (twice its size), more than the {max_decoded_bytes} bytes one "
            "dataset may take (setting max_decoded_bytes)"
        )
    return decoded


def read_csv_dataset(
    path: Path, *, label: str, features: list[str] | None, groups: list[str], max_columns: int = MAX_COLUMNS
) -> ParsedDataset:
    """Read a UTF-8 CSV with a header row in one streaming pass.

    ``features`` defaults to every column that is neither the label nor a group column."""
    path = Path(path)
    _check_request(path, features, groups, max_columns)
    with _csv_reader(path, max_columns) as reader:
        columns = _locate_columns(_read_header(reader, max_columns), label, features, groups)
        table = _read_rows(reader, columns)
    x = table.features()
    y, classes = _labels(table.labels, f"the label column {quoted(label)}")
    coded = {
        attr: _group_column(values, f"group column {attr!r}") for attr, values in zip(groups, table.groups, strict=True)
    }
    return ParsedDataset(x=x, y=y, classes=classes, groups=coded)


@dataclass(frozen=True)
class _Columns:
    """Where the wanted columns are in each row."""

    width: int  # cells per row
    label_name: str
    label: int
    groups: list[int]
    features: list[int]
    feature_names: list[str]


def _check_request(path: Path, features: list[str] | None, groups: list[str], max_columns: int) -> None:
    size = path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise InvalidInput(
            f"the CSV is {size} bytes, more than the {MAX_CSV_BYTES} bytes a CSV may have; upload the "
            "dataset as .npz (np.savez) instead"
        )
    if not groups:
        raise InvalidInput("name at least one group attribute column (groups); the audit compares groups")
    for what, names in (("groups", groups), ("features", features or [])):
        if len(names) > max_columns:
            raise InvalidInput(
                f"{what} names {len(names)} columns, more than the {max_columns} a dataset may have "
                "(setting max_columns)"
            )
        counts = Counter(names)
        dup = sorted(n for n, count in counts.items() if count > 1)
        if dup:
            raise InvalidInput(f"{what} lists {listing(dup)} more than once")
    for attr in groups:
        check_attribute_name(attr, "rename the CSV column")


@contextmanager
def _csv_reader(path: Path, max_columns: int) -> Iterator[Iterator[list[str]]]:
    """The file's rows; a decoding or quoting error while they are read becomes InvalidInput."""
    with _open_text(path) as handle:
        reader = csv.reader(_bounded_lines(handle, max_columns), strict=True)
        try:
            yield reader
        except csv.Error as exc:
            raise InvalidInput(f"the CSV is malformed near line {reader.line_num}: {exc}; check its quoting") from None
        except UnicodeDecodeError:
            raise InvalidInput("the CSV is not valid UTF-8; save it with UTF-8 encoding") from None


def _bounded_lines(handle: TextIO, max_columns: int) -> Iterator[str]:
    """The file's lines, refused before csv splits them when one holds so many commas that its cells could
    not fit `max_columns` even if most of them were quoted inside cells: a line of a million commas would
    otherwise become a list of a million cells first."""
    most_commas = _COMMAS_PER_COLUMN * max_columns
    for line_number, line in enumerate(handle, start=1):
        if line.count(",") > most_commas:
            raise InvalidInput(
                f"CSV line {line_number} holds {line.count(',')} commas, far more than the {max_columns} columns "
                "a dataset may have (setting max_columns)"
            )
        yield line


def _open_text(path: Path) -> TextIO:
    """The file opened for reading as text; a file that cannot be opened becomes InvalidInput."""
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InvalidInput(f"the CSV cannot be opened ({exc})") from None


def _read_header(reader: Iterator[list[str]], max_columns: int) -> list[str]:
    header = next(reader, None)
    if header is None:
        raise InvalidInput("the CSV is empty; it needs a header row naming the columns and data rows")
    if len(header) > max_columns:
        raise InvalidInput(
            f"the CSV header has {len(header)} columns, more than the {max_columns} a dataset may have "
            "(setting max_columns)"
        )
    header = [name.strip() for name in header]
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        separator = "';'" if ";" in header[0] else "tabs"
        raise InvalidInput(
            f"the CSV header has one column {quoted(header[0])}; the file seems to separate values with "
            f"{separator}; save it with commas"
        )
    return header


def _column_listing(header: list[str]) -> str:
    return listing(header, 50)


def _locate_columns(header: list[str], label: str, features: list[str] | None, groups: list[str]) -> _Columns:
    index: dict[str, int] = {}
    for i, name in enumerate(header):
        index.setdefault(name, i)
    absent = [c for c in dict.fromkeys([label, *groups, *(features or [])]) if c not in index]
    if absent:
        raise InvalidInput(
            f"the CSV has no column {listing(absent)}; available columns: {_column_listing(header)}",
            errors=[{"key": c[:NAME_CHARS], "problem": "missing_column"} for c in absent[:LISTED]],
        )
    feature_names = _feature_names(header, label, features, groups)
    counts = Counter(header)
    dup = sorted({c for c in (label, *groups, *feature_names) if counts[c] > 1})
    if dup:
        raise InvalidInput(f"the CSV header has more than one column named {listing(dup)}")
    return _Columns(
        width=len(header),
        label_name=label,
        label=index[label],
        groups=[index[g] for g in groups],
        features=[index[f] for f in feature_names],
        feature_names=feature_names,
    )


def _feature_names(header: list[str], label: str, features: list[str] | None, groups: list[str]) -> list[str]:
    if features is not None:
        if label in features:
            raise InvalidInput(f"the label column {quoted(label)} cannot also be a feature")
        names = list(features)
    else:
        unnamed = [i + 1 for i, h in enumerate(header) if h == ""]
        if unnamed:
            raise InvalidInput(
                f"CSV column {unnamed[0]} has no name (a pandas index? save with index=False), so "
                "it cannot be used as a feature; name it or list the features explicitly"
            )
        not_features = {label, *groups}
        names = [h for h in header if h not in not_features]
    if not names:
        raise InvalidInput(
            f"the CSV has no feature columns: every column is the label or a group attribute "
            f"(columns: {_column_listing(header)})"
        )
    return names


class _Interner:
    """Maps stripped strings to provisional codes (in order of first appearance) while streaming."""

    __slots__ = ("ids", "values", "codes")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.values: list[str] = []
        self.codes = array("i")

    def add(self, text: str) -> None:
        code = self.ids.get(text)
        if code is None:
            code = self.ids[text] = len(self.values)
            self.values.append(text)
        self.codes.append(code)

    def provisional(self) -> np.ndarray:
        return np.frombuffer(self.codes, dtype=np.int32) if len(self.codes) else np.zeros(0, dtype=np.int32)


class _Table:
    """What the streaming pass keeps of the rows: label and group texts, and feature blocks."""

    def __init__(self, columns: _Columns) -> None:
        self.columns = columns
        self.labels = _Interner()
        self.groups = [_Interner() for _ in columns.groups]
        self._blocks: list[np.ndarray] = []
        self._cells: list[list[str]] = []
        self._row_numbers: list[int] = []

    def add(self, row: list[str], row_number: int) -> None:
        self.labels.add(row[self.columns.label].strip())
        for interner, i in zip(self.groups, self.columns.groups, strict=True):
            interner.add(row[i].strip())
        self._cells.append([row[i] for i in self.columns.features])
        self._row_numbers.append(row_number)
        if len(self._cells) >= _CSV_CHUNK_ROWS:
            self._parse_pending()

    def _parse_pending(self) -> None:
        self._blocks.append(_feature_block(self._cells, self._row_numbers, self.columns.feature_names))
        self._cells, self._row_numbers = [], []

    def features(self) -> np.ndarray:
        if self._cells:
            self._parse_pending()
        if not self._blocks:
            raise InvalidInput("the CSV has a header but no data rows; the dataset needs at least one example")
        return np.concatenate(self._blocks, axis=0) if len(self._blocks) > 1 else self._blocks[0]


def _read_rows(reader: Iterator[list[str]], columns: _Columns) -> _Table:
    table = _Table(columns)
    for row_number, row in enumerate(reader, start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if len(row) != columns.width:
            raise InvalidInput(
                f"CSV row {row_number} has {len(row)} cells but the header has {columns.width}; every row needs "
                "one cell per column (quote cells that contain commas)"
            )
        if not row[columns.label].strip():
            raise InvalidInput(
                f"the label column {quoted(columns.label_name)} is empty in row {row_number}; every row needs a label"
            )
        table.add(row, row_number)
    return table


def _feature_block(cells: list[list[str]], row_numbers: list[int], names: list[str]) -> np.ndarray:
    try:
        block = np.array(cells, dtype=np.float64)
    except ValueError:  # some cell numpy cannot read: parse cell by cell, to say which
        block = np.array(
            [
                [_number(cell, names[c], row_number) for c, cell in enumerate(row)]
                for row, row_number in zip(cells, row_numbers, strict=True)
            ],
            dtype=np.float64,
        )
    with np.errstate(over="ignore"):
        out = block.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        r, c = (int(v[0]) for v in np.nonzero(bad))
        raise InvalidInput(
            f"feature column {quoted(names[c])} has {quoted(cells[r][c].strip())} in row {row_numbers[r]}, which is "
            "not a finite float32 number; features must be finite "
            "(rows count from 1 at the header, as in a spreadsheet)"
        )
    return out


def _number(cell: str, column: str, row_number: int) -> float:
    try:
        return float(cell)
    except ValueError:
        raise InvalidInput(
            f"feature column {quoted(column)} has {quoted(cell)} in row {row_number}, which is not a number; features "
            "must be numeric (rows count from 1 at the header, as in a spreadsheet)"
        ) from None


def _labels(labels: _Interner, what: str) -> tuple[np.ndarray, list[str]]:
    """Class indices when every label is an integer >= 0, else the distinct texts in sorted order."""
    indices = _class_indices(labels.values)
    if indices is not None:
        # Checked before numpy sees them: a label can be larger than int64.
        check_largest_class_index(max(indices, default=-1), what)
        return labels_from_class_indices(np.asarray(indices, dtype=np.int64)[labels.provisional()], what)
    if len(labels.values) > MAX_CLASSES:
        raise InvalidInput(
            f"{what} has {len(labels.values)} distinct values, more than the {MAX_CLASSES} classes supported"
        )
    order = sorted(range(len(labels.values)), key=labels.values.__getitem__)
    remap = np.empty(len(order), dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[labels.provisional()], [labels.values[i] for i in order]


def _class_indices(texts: list[str]) -> list[int] | None:
    indices = []
    for text in texts:
        try:
            value = int(text)
        except ValueError:
            return None
        if value < 0:
            return None
        indices.append(value)
    return indices


def _group_column(values: _Interner, what: str) -> GroupColumn:
    """Coded in numeric order when every present value is a number, else in text order; the missing
    tokens (blank, NaN, NA, None) become -1."""
    keep = [i for i, text in enumerate(values.values) if text.lower() not in MISSING_TOKENS]
    present = [values.values[i] for i in keep]
    try:
        keys = [float(text) for text in present]
        order = sorted(range(len(present)), key=lambda j: (keys[j], present[j]))
    except ValueError:
        order = sorted(range(len(present)), key=present.__getitem__)
    remap = np.full(len(values.values), -1, dtype=np.int32)
    for code, j in enumerate(order):
        remap[keep[j]] = code
    return checked_group(GroupColumn(codes=remap[values.provisional()], names=[present[j] for j in order]), what)
