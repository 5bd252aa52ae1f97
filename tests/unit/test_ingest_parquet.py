"""Parquet datasets (service/ingest/parquet.py) read exactly as the same table as CSV, chosen by the PAR1 magic
(not the name), bounded by the footer before anything is read, and refused when a column is not plain data."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.catalog import dataset_format
from service.errors import InvalidInput
from service.ingest import parquet
from service.ingest.csv import read_csv_dataset
from service.ingest.parquet import read_parquet_dataset

TABLE = {
    "age": [31.5, 22.0, 45.25, 60.0, 38.0, 27.0],
    "income": [1, 2, 3, 4, 5, 6],
    "outcome": ["yes", "no", "no", "yes", "maybe", "no"],
    "sex": ["f", "m", None, "f", "m", "NA"],
    "band": [10, 2, 2, 10, 30, 2],
}


def write(tmp_path, table: dict | pa.Table, name: str = "data.bin"):
    path = tmp_path / name
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path)
    return path


def as_csv(tmp_path, table: dict):
    lines = [",".join(table)] + [
        ",".join("" if v is None else str(v) for v in row) for row in zip(*table.values(), strict=True)
    ]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_parquet_table_reads_as_the_same_table_in_csv(tmp_path):
    form = {"label": "outcome", "features": None, "groups": ["sex", "band"]}
    from_parquet = read_parquet_dataset(write(tmp_path, TABLE), **form)
    from_csv = read_csv_dataset(as_csv(tmp_path, TABLE), **form)
    np.testing.assert_array_equal(from_parquet.x, from_csv.x)
    assert from_parquet.x.dtype == np.float32 and from_parquet.x.shape == (6, 2)
    np.testing.assert_array_equal(from_parquet.y, from_csv.y)
    assert from_parquet.classes == from_csv.classes == ["maybe", "no", "yes"]
    for attr in ("sex", "band"):
        np.testing.assert_array_equal(from_parquet.groups[attr].codes, from_csv.groups[attr].codes)
        assert from_parquet.groups[attr].names == from_csv.groups[attr].names
    assert from_parquet.groups["band"].names == ["2", "10", "30"]  # numeric order, as in a CSV
    assert list(from_parquet.groups["sex"].codes) == [0, 1, -1, 0, 1, -1]  # null and "NA" are missing


def test_the_format_is_the_content_not_the_name(tmp_path):
    path = write(tmp_path, TABLE, "looks-like.csv")
    assert dataset_format("looks-like.csv", path) == "parquet"
    assert dataset_format("data.npz", path) == "parquet"
    text = tmp_path / "plain.parquet"
    text.write_text("a,b\n1,2\n")
    assert dataset_format("plain.parquet", text) == "csv"


def test_declared_size_over_the_caps_is_refused_before_reading(tmp_path, monkeypatch):
    path = write(tmp_path, TABLE)
    monkeypatch.setattr(parquet, "MAX_CELLS", 6 * 5 - 1)  # 6 rows × 5 columns read is one cell too many
    with pytest.raises(InvalidInput, match="declares 6 rows × 5 columns"):
        read_parquet_dataset(path, label="outcome", features=None, groups=["sex", "band"])
    monkeypatch.setattr(parquet, "MAX_CELLS", 10**9)
    monkeypatch.setattr(parquet, "MAX_UNCOMPRESSED_BYTES", 10)
    with pytest.raises(InvalidInput, match="bytes uncompressed"):
        read_parquet_dataset(path, label="outcome", features=None, groups=["sex", "band"])


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (pa.array([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]), "has type list"),
        (pa.array([b"\x00"] * 6), "has type binary"),
        (pa.ExtensionArray.from_storage(pa.uuid(), pa.array([b"0" * 16] * 6, pa.binary(16))), "has type extension"),
        (pa.array(["1", "2", "x", "4", "5", "6"]), "features must be numeric"),
        (pa.array([1.0, None, 3.0, 4.0, 5.0, 6.0]), "empty cells"),
        (pa.array([1.0, np.inf, 3.0, 4.0, 5.0, 6.0]), "not a finite float32"),
    ],
)
def test_a_feature_column_that_is_not_plain_numbers_is_refused(tmp_path, column, message):
    table = pa.table({**TABLE, "odd": column})
    with pytest.raises(InvalidInput, match=message):
        read_parquet_dataset(write(tmp_path, table), label="outcome", features=["age", "odd"], groups=["sex"])


def test_form_and_file_mistakes_are_named(tmp_path):
    path = write(tmp_path, TABLE)
    with pytest.raises(InvalidInput, match="no column 'race'"):
        read_parquet_dataset(path, label="outcome", features=None, groups=["race"])
    with pytest.raises(InvalidInput, match="empty labels"):
        table = {**TABLE, "outcome": ["a", None, "b", "a", "b", "a"]}
        read_parquet_dataset(write(tmp_path, table), label="outcome", features=None, groups=["sex"])
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"PAR1" + b"\x00" * 100)
    with pytest.raises(InvalidInput, match="cannot be read as Parquet"):
        read_parquet_dataset(broken, label="outcome", features=None, groups=["sex"])


def test_a_pandas_index_column_is_not_a_default_feature(tmp_path):
    table = pa.table({**TABLE, "__index_level_0__": list(range(6))})
    parsed = read_parquet_dataset(write(tmp_path, table), label="outcome", features=None, groups=["sex"])
    assert parsed.x.shape == (6, 3)  # age, income, band


def test_integer_labels_are_class_indices(tmp_path):
    buffer = io.BytesIO()
    pq.write_table(pa.table({**TABLE, "outcome": [0, 1, 1, 2, 0, 1]}), buffer)
    path = tmp_path / "int.bin"
    path.write_bytes(buffer.getvalue())
    parsed = read_parquet_dataset(path, label="outcome", features=["age"], groups=["sex"])
    assert parsed.classes == ["0", "1", "2"] and list(parsed.y) == [0, 1, 1, 2, 0, 1]
