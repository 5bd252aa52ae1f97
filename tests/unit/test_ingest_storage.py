"""service.ingest.dataset.save_dataset: the summary it returns, and the files it stores as
service.dataset_files reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.dataset_files import open_dataset_files
from service.ingest.dataset import GroupColumn, ParsedDataset, save_dataset
from service.storage import BlobStore
from service.temp_names import temp_prefix
from tests.unit.ingest_support import invalid


def test_save_and_load_round_trip(tmp_path):
    ds = ParsedDataset(
        x=np.arange(24, dtype=np.float32).reshape(4, 2, 3),
        y=np.array([1, 0, 2, 1], dtype=np.int64),
        classes=["a", "b", "c"],
        groups={
            "sex": GroupColumn(codes=np.array([0, 1, 1, -1], dtype=np.int32), names=["f", "m"]),
            "age": GroupColumn(codes=np.array([2, 2, 2, 0], dtype=np.int32), names=["1", "2", "3"]),
        },
    )
    directory = tmp_path / "blobs" / "ds1"
    summary = save_dataset(ds, directory)
    assert summary == {
        "rows": 4,
        "feature_shape": [2, 3],
        "classes": ["a", "b", "c"],
        "groups": {
            "sex": {"names": ["f", "m"], "sizes": [1, 2], "missing": 1},
            "age": {"names": ["1", "2", "3"], "sizes": [1, 0, 3], "missing": 0},
        },
    }
    assert json.loads(json.dumps(summary)) == summary  # JSON-serialisable as is
    assert sorted(p.name for p in directory.iterdir()) == ["group_age.npy", "group_sex.npy", "x.npy", "y.npy"]

    stored = open_dataset_files(directory, ["sex"])
    assert all(isinstance(a, np.memmap) for a in (stored.x, stored.y, stored.groups["sex"]))
    assert stored.x.dtype == np.float32 and stored.y.dtype == np.int64 and stored.groups["sex"].dtype == np.int32
    np.testing.assert_array_equal(stored.x, ds.x)
    assert stored.y.tolist() == [1, 0, 2, 1]
    assert list(stored.groups) == ["sex"] and stored.groups["sex"].tolist() == [0, 1, 1, -1]
    with pytest.raises(ValueError):
        stored.x[0, 0, 0] = 1.0  # read-only mapping


def test_load_unknown_attribute(tmp_path):
    ds = ParsedDataset(
        x=np.zeros((1, 1), np.float32),
        y=np.zeros(1, np.int64),
        classes=["0"],
        groups={"sex": GroupColumn(codes=np.zeros(1, np.int32), names=["f"])},
    )
    save_dataset(ds, tmp_path)
    err = invalid(open_dataset_files, tmp_path, ["race", "sex"])
    assert err.detail == "the dataset has no group attribute 'race'; it has: sex"


def test_dataset_files_are_written_under_tmp_and_moved_into_place(tmp_path):
    store = BlobStore(tmp_path)
    with store.staged_dataset_dir("d1") as directory:
        assert directory.parent == tmp_path / "tmp" and directory.name.startswith(temp_prefix("dataset"))
        (directory / "x.npy").write_bytes(b"x")
        assert not store.dataset_dir("d1").exists()
    assert (store.dataset_dir("d1") / "x.npy").read_bytes() == b"x"
    with pytest.raises(OSError), store.staged_dataset_dir("d2") as directory:
        (directory / "x.npy.tmp").write_bytes(b"half")
        raise OSError("disk full")
    assert not store.dataset_dir("d2").exists() and not list((tmp_path / "tmp").iterdir())
