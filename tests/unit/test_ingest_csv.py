"""service.ingest.csv: CSV datasets read in one streaming pass, labels and groups coded."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from service.dataset_files import open_dataset_files
from service.errors import PayloadTooLarge
from service.ingest import csv as csv_ingest
from service.ingest.csv import read_csv_dataset
from service.ingest.dataset import save_dataset
from tests.unit.ingest_support import invalid


def write_csv(path: Path, text: str, *, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


HAPPY = """height,label,age,weight,sex
1.5,cat,10,60,f
2,dog,9,-3.25,m
0.5,cat,,1e2,f
3,bird,2,0,NA
"""


def test_csv_happy_path(tmp_path):
    path = write_csv(tmp_path / "d.csv", HAPPY, bom=True)
    ds = read_csv_dataset(path, label="label", features=None, groups=["age", "sex"])
    assert ds.x.dtype == np.float32 and ds.x.shape == (4, 2)
    np.testing.assert_array_equal(ds.x, np.array([[1.5, 60], [2, -3.25], [0.5, 100], [3, 0]], dtype=np.float32))
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [1, 2, 1, 0]
    assert ds.groups["age"].names == ["2", "9", "10"]
    assert ds.groups["age"].codes.tolist() == [2, 1, -1, 0]
    assert ds.groups["sex"].names == ["f", "m"]
    assert ds.groups["sex"].codes.tolist() == [0, 1, 0, -1]


def test_csv_int_labels_and_explicit_features(tmp_path):
    text = "a,b,c,y,g\n1,2,3,2,x\n4,5,6,0,y\n7,8,9,2,x\n"
    path = write_csv(tmp_path / "d.csv", text)
    ds = read_csv_dataset(path, label="y", features=["c", "a"], groups=["g"])
    np.testing.assert_array_equal(ds.x, np.array([[3, 1], [6, 4], [9, 7]], dtype=np.float32))
    assert ds.classes == ["0", "1", "2"]
    assert ds.y.tolist() == [2, 0, 2]
    assert ds.groups["g"].names == ["x", "y"] and ds.groups["g"].codes.tolist() == [0, 1, 0]


def test_csv_group_may_be_a_feature_when_listed(tmp_path):
    path = write_csv(tmp_path / "d.csv", "f,sex,y\n1,0,a\n2,1,b\n")
    ds = read_csv_dataset(path, label="y", features=["f", "sex"], groups=["sex"])
    np.testing.assert_array_equal(ds.x, np.array([[1, 0], [2, 1]], dtype=np.float32))
    assert ds.groups["sex"].names == ["0", "1"]


def test_csv_bad_column_names(tmp_path):
    path = write_csv(tmp_path / "d.csv", HAPPY)
    err = invalid(read_csv_dataset, path, label="target", features=["height", "bmi"], groups=["age"])
    assert (
        "the CSV has no column 'target', 'bmi'; available columns: 'height', 'label', 'age', 'weight', 'sex'"
        in err.detail
    )
    assert err.errors == [
        {"key": "target", "problem": "missing_column"},
        {"key": "bmi", "problem": "missing_column"},
    ]
    err = invalid(read_csv_dataset, path, label="label", features=None, groups=["race"])
    assert "the CSV has no column 'race'" in err.detail


def test_csv_non_numeric_feature_row_number(tmp_path):
    text = "x1,x2,y,g\n1,2,0,a\n3,4,1,b\n5,six,1,a\n"
    path = write_csv(tmp_path / "d.csv", text)
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"])
    assert "feature column 'x2' has 'six' in row 4, which is not a number" in err.detail


def test_csv_empty_and_nonfinite_feature(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x1,y,g\n1,0,a\n,1,b\n")
    assert (
        "feature column 'x1' has '' in row 3"
        in invalid(read_csv_dataset, path, label="y", features=None, groups=["g"]).detail
    )
    path = write_csv(tmp_path / "e.csv", "x1,y,g\n1,0,a\n2,1,b\nnan,1,b\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"])
    assert "feature column 'x1' has 'nan' in row 4, which is not a finite float32 number" in err.detail


def test_csv_row_numbers_across_chunks_and_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(csv_ingest, "_CSV_CHUNK_ROWS", 2)
    text = "x,y,g\n1,0,a\n2,0,a\n\n3,1,b\n4,1,b\n5,1,b\nbad,1,b\n"
    path = write_csv(tmp_path / "d.csv", text)
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"])
    assert "has 'bad' in row 8" in err.detail
    path = write_csv(tmp_path / "ok.csv", text.replace("bad", "6"))
    ds = read_csv_dataset(path, label="y", features=None, groups=["g"])
    assert ds.x[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert ds.y.tolist() == [0, 0, 1, 1, 1, 1]


def test_csv_missing_label(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x,y,g\n1,0,a\n2,,b\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"])
    assert "the label column 'y' is empty in row 3; every row needs a label" in err.detail


def test_csv_ragged_row(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x,y,g\n1,0,a\n2,1\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"])
    assert "CSV row 3 has 2 cells but the header has 3" in err.detail


def test_csv_other_bad_inputs(tmp_path, monkeypatch):
    empty = write_csv(tmp_path / "e.csv", "")
    assert "the CSV is empty" in invalid(read_csv_dataset, empty, label="y", features=None, groups=["g"]).detail
    header_only = write_csv(tmp_path / "h.csv", "x,y,g\n")
    assert "no data rows" in invalid(read_csv_dataset, header_only, label="y", features=None, groups=["g"]).detail
    semi = write_csv(tmp_path / "s.csv", "x;y;g\n1;0;a\n")
    err = invalid(read_csv_dataset, semi, label="y", features=None, groups=["g"])
    assert "seems to separate values with ';'" in err.detail
    pandas_index = write_csv(tmp_path / "p.csv", ",x,y,g\n0,1,0,a\n")
    err = invalid(read_csv_dataset, pandas_index, label="y", features=None, groups=["g"])
    assert "CSV column 1 has no name (a pandas index? save with index=False)" in err.detail
    latin1 = tmp_path / "l.csv"
    latin1.write_bytes("x,y,g\n1,0,caf\xe9\n".encode("latin-1"))
    assert "not valid UTF-8" in invalid(read_csv_dataset, latin1, label="y", features=None, groups=["g"]).detail
    ok = write_csv(tmp_path / "ok.csv", "x,y,g\n1,0,a\n")
    assert "at least one group attribute" in invalid(read_csv_dataset, ok, label="y", features=None, groups=[]).detail
    err = invalid(read_csv_dataset, ok, label="y", features=["x", "y"], groups=["g"])
    assert "the label column 'y' cannot also be a feature" in err.detail
    monkeypatch.setattr(csv_ingest, "MAX_CSV_BYTES", 5)
    err = invalid(read_csv_dataset, ok, label="y", features=None, groups=["g"])
    assert "more than the 5 bytes a CSV may have; upload the dataset as .npz" in err.detail


def test_csv_bad_group_column_name(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x,y,skin tone\n1,0,a\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["skin tone"])
    assert "'skin tone' cannot be a group attribute name" in err.detail and "rename the CSV column" in err.detail


def test_csv_to_storage_end_to_end(tmp_path):
    path = write_csv(tmp_path / "d.csv", HAPPY)
    ds = read_csv_dataset(path, label="label", features=None, groups=["age", "sex"])
    summary = save_dataset(ds, tmp_path / "store")
    assert summary["groups"]["age"] == {"names": ["2", "9", "10"], "sizes": [1, 1, 1], "missing": 1}
    assert summary["groups"]["sex"] == {"names": ["f", "m"], "sizes": [2, 1], "missing": 1}
    stored = open_dataset_files(tmp_path / "store", ["age", "sex"])
    assert stored.y.tolist() == [1, 2, 1, 0] and stored.groups["age"].tolist() == [2, 1, -1, 0]


def test_label_ids_beyond_class_limit(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x,y,g\n1,0,a\n2,123456,b\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"])
    assert "the largest label in the label column 'y' is 123456" in err.detail
    assert "store them as strings" in err.detail


def test_label_beyond_int64_is_invalid_input_not_an_overflow(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x,y,g\n1,0,a\n2,99999999999999999999,b\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"])
    assert "the largest label in the label column 'y' is 99999999999999999999" in err.detail


def test_csv_many_feature_names_cost_linear_time_and_are_capped(tmp_path):
    # Item 5 of issue #16: 40,000 names took 25.5 s of CPU in a quadratic duplicate check.
    names = [f"c{i}" for i in range(40_000)]
    path = write_csv(tmp_path / "d.csv", ",".join(["y", "g", *names]) + "\n" + ",".join(["1", "a"] + ["0"] * 40_000))
    started = time.process_time()
    ds = read_csv_dataset(path, label="y", features=names, groups=["g"], max_columns=50_000)
    assert ds.x.shape == (1, 40_000) and time.process_time() - started < 2
    err = invalid(read_csv_dataset, path, label="y", features=names, groups=["g"], max_columns=10_000)
    assert "features names 40000 columns, more than the 10000 a dataset may have (setting max_columns)" in err.detail
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"], max_columns=20_000)
    assert "the CSV header has 40002 columns, more than the 20000" in err.detail
    dup = invalid(read_csv_dataset, path, label="y", features=names + names[:7], groups=["g"], max_columns=50_000)
    assert "features lists 'c0', 'c1', 'c2', 'c3', 'c4' and 2 more more than once" in dup.detail


def test_csv_line_of_commas_is_refused_before_it_is_split(tmp_path):
    path = write_csv(tmp_path / "d.csv", "y,g,f\n" + "," * 100_000 + "\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"], max_columns=100)
    assert "CSV line 2 holds 100000 commas, far more than the 100 columns" in err.detail


def test_csv_decoded_bytes_are_capped(tmp_path):
    path = write_csv(tmp_path / "d.csv", HAPPY)
    assert csv_ingest.csv_decoded_bytes(path, 10_000) == 2 * len(HAPPY)
    with pytest.raises(PayloadTooLarge) as info:
        csv_ingest.csv_decoded_bytes(path, 100)
    assert "more than the 100 bytes one dataset may take (setting max_decoded_bytes)" in info.value.detail


def test_csv_errors_quote_long_names_short(tmp_path):
    long_name = "n" * 100_000
    path = write_csv(tmp_path / "d.csv", HAPPY)
    err = invalid(read_csv_dataset, path, label=long_name, features=None, groups=["sex"])
    assert len(err.detail) < 2_000 and "(100000 characters)" in err.detail
    assert [e["key"] for e in err.errors] == [long_name[:80]]
