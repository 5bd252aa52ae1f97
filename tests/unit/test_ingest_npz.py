"""service.ingest.npz: .npz datasets read with allow_pickle=False, labels and groups coded."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from service.errors import PayloadTooLarge
from service.ingest.limits import MAX_DECODED_BYTES
from service.ingest.npz import read_npz_dataset
from service.ingest.npz_archive import MAX_ARRAYS
from tests.unit.ingest_support import invalid


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_int_labels_and_groups(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    path = write_npz(
        tmp_path / "d.npz",
        x=x,
        y=np.array([0, 3, 1, 3]),
        group_age=np.array([10, 2, 10, 9]),
        group_sex=np.array(["f", "m", "f", "x"]),
    )
    ds = read_npz_dataset(path)
    assert ds.x.dtype == np.float32 and ds.x.shape == (4, 3)
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [0, 3, 1, 3]
    assert ds.classes == ["0", "1", "2", "3"]
    assert list(ds.groups) == ["age", "sex"]
    assert ds.groups["age"].names == ["2", "9", "10"]  # numeric order, not "10" < "2"
    assert ds.groups["age"].codes.dtype == np.int32
    assert ds.groups["age"].codes.tolist() == [2, 0, 2, 1]
    assert ds.groups["sex"].names == ["f", "m", "x"]
    assert ds.groups["sex"].codes.tolist() == [0, 1, 0, 2]


def test_npz_string_labels_and_missing_group_values(tmp_path):
    path = write_npz(
        tmp_path / "d.npz",
        x=np.zeros((6, 2, 2), dtype=np.float32),
        y=np.array(["dog", "cat", "dog", "bird", " cat ", "cat"]),
        group_race=np.array(["b", " NA ", "a", "none", "", "NaN"]),
        group_skin=np.array([b"light", b"dark", b"None", b"dark", b"light", b"light"]),
    )
    ds = read_npz_dataset(path)
    assert ds.x.shape == (6, 2, 2)
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.y.tolist() == [2, 1, 2, 0, 1, 1]
    assert ds.groups["race"].names == ["a", "b"]
    assert ds.groups["race"].codes.tolist() == [1, -1, 0, -1, -1, -1]
    assert ds.groups["skin"].names == ["dark", "light"]
    assert ds.groups["skin"].codes.tolist() == [1, 0, -1, 0, 1, 1]


def test_npz_float_labels_and_float_groups(tmp_path):
    path = write_npz(
        tmp_path / "d.npz",
        x=np.ones((4, 1), dtype=np.int32),
        y=np.array([1.0, 0.0, 2.0, 1.0]),
        group_age=np.array([3.0, np.nan, 1.0, 2.5]),
        group_flag=np.array([True, False, True, True]),
    )
    ds = read_npz_dataset(path)
    assert ds.y.tolist() == [1, 0, 2, 1] and ds.classes == ["0", "1", "2"]
    assert ds.groups["age"].names == ["1", "2.5", "3"]
    assert ds.groups["age"].codes.tolist() == [2, -1, 0, 1]
    assert ds.groups["flag"].names == ["False", "True"]
    assert ds.groups["flag"].codes.tolist() == [1, 0, 1, 1]


def test_npz_non_integral_float_labels(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.ones((3, 1)), y=np.array([1.0, 0.5, 2.0]), group_g=np.array([1, 1, 2]))
    err = invalid(read_npz_dataset, path)
    assert "y holds floats and 1 are not whole numbers (e.g. 0.5 in row 1, 0-based)" in err.detail


def test_npz_negative_labels(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.ones((3, 1)), y=np.array([1, -1, 0]), group_g=np.array([1, 1, 2]))
    err = invalid(read_npz_dataset, path)
    assert "y has 1 negative labels (rows, 0-based: 1)" in err.detail


def test_npz_nan_and_inf_in_x(tmp_path):
    x = np.ones((5, 2))
    x[1, 0] = np.nan
    x[3, 1] = np.nan
    x[3, 0] = np.nan
    x[4, 1] = np.inf
    path = write_npz(tmp_path / "d.npz", x=x, y=np.zeros(5, dtype=int), group_g=np.arange(5))
    err = invalid(read_npz_dataset, path)
    assert err.detail == (
        "x has 3 NaN values (first rows, 0-based: 1, 3) and 1 infinite values (first rows, 0-based: 4); "
        "every feature must be a finite number"
    )


def test_npz_x_overflows_float32(tmp_path):
    x = np.ones((2, 2))
    x[1, 1] = 1e300
    path = write_npz(tmp_path / "d.npz", x=x, y=np.zeros(2, dtype=int), group_g=np.arange(2))
    err = invalid(read_npz_dataset, path)
    assert "1 infinite values, 1 of them finite float64 values too large for float32" in err.detail


@pytest.mark.parametrize(
    "x, fragment",
    [
        (np.ones((3, 2), dtype=bool), "x is a boolean array"),
        (np.ones(3), "x has shape [3]; it must be [N, features...]"),
        (np.array([["a", "b"]] * 3), "x has dtype <U1; features must be integers or floats"),
    ],
)
def test_npz_bad_x(tmp_path, x, fragment):
    path = write_npz(tmp_path / "d.npz", x=x, y=np.zeros(3, dtype=int), group_g=np.arange(3))
    assert fragment in invalid(read_npz_dataset, path).detail


def test_npz_no_rows(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.ones((0, 2)), y=np.zeros(0, dtype=int), group_g=np.zeros(0, dtype=int))
    assert "x has no rows" in invalid(read_npz_dataset, path).detail


def test_npz_object_arrays_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((2, 1)), y=np.array([0, 1]), group_g=np.array(["a", None], dtype=object))
    err = invalid(read_npz_dataset, path)
    assert "array 'group_g' is an object array" in err.detail
    assert "unpickled, which is refused" in err.detail


def test_npz_wrong_lengths(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.ones((3, 1)), y=np.zeros(2, dtype=int), group_g=np.arange(3))
    assert "y has shape [2]; it must be 1-D with one label per row of x (3)" in invalid(read_npz_dataset, path).detail
    path = write_npz(tmp_path / "e.npz", x=np.ones((3, 1)), y=np.zeros(3, dtype=int), group_g=np.arange(4))
    assert (
        "group_g has shape [4]; it must be 1-D with one value per row of x (3)"
        in invalid(read_npz_dataset, path).detail
    )


def test_npz_no_group_attribute(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.ones((3, 1)), y=np.zeros(3, dtype=int))
    err = invalid(read_npz_dataset, path)
    assert "the .npz has no group attribute: add at least one array named group_<attribute>" in err.detail


def test_npz_unknown_arrays(tmp_path):
    path = write_npz(
        tmp_path / "d.npz", x=np.ones((3, 1)), y=np.zeros(3, dtype=int), group_g=np.arange(3), weights=np.ones(3)
    )
    err = invalid(read_npz_dataset, path)
    assert "arrays this service does not know: 'weights'" in err.detail
    assert "allowed names are x, y and group_<attribute>" in err.detail
    assert err.errors == [{"key": "weights", "problem": "unexpected"}]


def test_npz_missing_x(tmp_path):
    path = write_npz(tmp_path / "d.npz", y=np.zeros(3, dtype=int), group_g=np.arange(3))
    assert "the .npz has no array 'x' (it has: 'y', 'group_g')" in invalid(read_npz_dataset, path).detail


def test_npz_bad_attribute_name(tmp_path):
    path = write_npz(
        tmp_path / "d.npz", x=np.ones((2, 1)), y=np.zeros(2, dtype=int), **{"group_skin tone": np.arange(2)}
    )
    err = invalid(read_npz_dataset, path)
    assert "'skin tone' cannot be a group attribute name" in err.detail


def test_npz_all_missing_group(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.ones((2, 1)), y=np.zeros(2, dtype=int), group_g=np.array(["", "NA"]))
    assert "group_g has no values: all 2 rows are missing" in invalid(read_npz_dataset, path).detail


def test_npz_corrupt_zip(tmp_path):
    good = write_npz(tmp_path / "d.npz", x=np.ones((50, 4)), y=np.zeros(50, dtype=int), group_g=np.arange(50))
    data = bytearray(good.read_bytes())
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    assert "the .npz archive is corrupt" in invalid(read_npz_dataset, truncated).detail
    # flip bytes inside the stored x.npy payload: the CRC check catches it
    data[200:260] = b"\xff" * 60
    flipped = tmp_path / "f.npz"
    flipped.write_bytes(bytes(data))
    assert "corrupt" in invalid(read_npz_dataset, flipped).detail


def test_npz_not_an_archive(tmp_path):
    single = tmp_path / "x.npy"
    np.save(single, np.ones(3))
    assert "this is a single .npy array, not an .npz archive" in invalid(read_npz_dataset, single).detail
    pkl = tmp_path / "d.pkl"
    pkl.write_bytes(pickle.dumps({"x": 1}))
    assert "not an .npz archive (it looks like a pickle, which is refused)" in invalid(read_npz_dataset, pkl).detail


def npz_with_header(path: Path, name: str, header: dict, data: bytes = b"", compress: bool = False) -> Path:
    """An .npz whose member `name` has the given .npy header dict, followed by `data`."""
    npy = io.BytesIO()
    npy_format.write_array_header_1_0(npy, header)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        archive.writestr(name, npy.getvalue() + data)
    return path


def f4(*shape: int) -> dict:
    return {"descr": "<f4", "fortran_order": False, "shape": shape}


def test_npz_listed_size_over_the_cap_is_413(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.ones((100, 4)), y=np.zeros(100, dtype=int), group_g=np.arange(100))
    with pytest.raises(PayloadTooLarge) as info:
        read_npz_dataset(path, max_decoded_bytes=1000)
    assert "expands to" in info.value.detail and "more than the 1000 bytes" in info.value.detail
    assert "max_decoded_bytes" in info.value.detail


def test_npz_declared_shape_over_the_cap_is_413_before_allocation(tmp_path):
    # 2d and 2e of issue #16: headers declaring 4e12 bytes and 4 TB in a few hundred bytes on the wire.
    for shape in ((10**7, 10**5), (10**12,)):
        path = npz_with_header(tmp_path / "d.npz", "x.npy", f4(*shape))
        with pytest.raises(PayloadTooLarge) as info:
            read_npz_dataset(path)
        assert f"array 'x' declares shape {list(shape)} of float32" in info.value.detail
        assert f"more than the {MAX_DECODED_BYTES} bytes one dataset may take (setting max_decoded_bytes)" in (
            info.value.detail
        )
    # Under the cap, a header that declares more than its entry holds is corrupt, not allocated.
    path = npz_with_header(tmp_path / "d.npz", "x.npy", f4(1000, 10), b"\0" * 16)
    assert "declares shape [1000, 10] of float32 (40000 bytes) but its entry holds 16" in (
        invalid(read_npz_dataset, path).detail
    )


def test_npz_decompression_bomb_is_413_without_decompressing(tmp_path):
    # Item 1 of issue #16 in small: zeros deflate ~1000:1, and the listed size alone refuses them.
    path = npz_with_header(tmp_path / "d.npz", "x.npy", f4(4096, 64), bytes(4096 * 64 * 4), compress=True)
    assert path.stat().st_size < 4096
    with pytest.raises(PayloadTooLarge) as info:
        read_npz_dataset(path, max_decoded_bytes=100_000)
    assert "more than the 100000 bytes" in info.value.detail


def test_npz_entries_that_are_not_arrays(tmp_path):
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x", b"raw bytes")
    assert "entries that are not .npy arrays: 'x'" in invalid(read_npz_dataset, path).detail
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(MAX_ARRAYS + 1):
            archive.writestr(f"group_{i}.npy", b"")
    assert f"has {MAX_ARRAYS + 1} entries in a " in invalid(read_npz_dataset, path).detail
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(20):  # few entries, but a directory of 1.2 MB: names of 60 kB
            archive.writestr(f"{i}" + "n" * 60_000 + ".npy", b"")
    assert "20 entries in a 1201030-byte directory" in invalid(read_npz_dataset, path).detail
    path = npz_with_header(tmp_path / "o.npz", "x.npy", {"descr": "|O", "fortran_order": False, "shape": (3,)})
    assert "object array" in invalid(read_npz_dataset, path).detail


def test_npz_bytes_that_are_not_ascii(tmp_path):
    text = np.array([b"\xff", b"a"])
    path = write_npz(tmp_path / "d.npz", x=np.ones((2, 1)), y=text, group_g=np.arange(2))
    assert "y holds bytes that are not ASCII text" in invalid(read_npz_dataset, path).detail
    path = write_npz(tmp_path / "d.npz", x=np.ones((2, 1)), y=np.arange(2), group_g=text)
    assert "group_g holds bytes that are not ASCII text" in invalid(read_npz_dataset, path).detail
