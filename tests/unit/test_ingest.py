"""service.ingest: safetensors header parsing, architecture fit, dataset readers and storage."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from service import ingest
from service.errors import InvalidInput
from service.ingest import (
    GroupColumn,
    ParsedDataset,
    TensorInfo,
    check_weights_fit,
    load_dataset_arrays,
    read_csv_dataset,
    read_npz_dataset,
    read_safetensors_header,
    save_dataset,
)

EXPORT_HINT = 'safetensors.torch.save_file(model.state_dict(), "model.safetensors")'


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def raw_safetensors(path: Path, header: dict, data: bytes = b"", *, header_bytes: bytes | None = None) -> Path:
    body = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def invalid(fn, *args, **kwargs) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        fn(*args, **kwargs)
    return info.value


def safe_open_meta(path: Path, framework: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    with safe_open(str(path), framework=framework) as f:
        for key in f.keys():
            sl = f.get_slice(key)
            out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


# --------------------------------------------------------------------------------------------------
# safetensors: valid files
# --------------------------------------------------------------------------------------------------


def test_torch_file_matches_safe_open(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(2, dtype=torch.float64),
        "f16": torch.randn(5, 1, dtype=torch.float16),
        "bf16": torch.randn(7, dtype=torch.bfloat16),
        "f8e4m3": torch.zeros(4, dtype=torch.float8_e4m3fn),
        "f8e5m2": torch.zeros(2, 2, dtype=torch.float8_e5m2),
        "i64": torch.arange(6).reshape(2, 3),
        "i32": torch.zeros(1, dtype=torch.int32),
        "i16": torch.zeros(3, dtype=torch.int16),
        "i8": torch.zeros(3, dtype=torch.int8),
        "u8": torch.zeros(2, dtype=torch.uint8),
        "u16": torch.zeros(2, dtype=torch.uint16),
        "u32": torch.zeros(2, dtype=torch.uint32),
        "u64": torch.zeros(2, dtype=torch.uint64),
        "flag": torch.ones(3, dtype=torch.bool),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }
    path = tmp_path / "m.safetensors"
    torch_save_file(tensors, str(path), metadata={"format": "pt", "note": "hi"})

    got = read_safetensors_header(path)
    reference = safe_open_meta(path, "pt")
    assert set(got) == set(tensors) == set(reference)
    for key, info in got.items():
        assert (info.dtype, info.shape) == reference[key]
        assert info.shape == tuple(tensors[key].shape)
    kinds = {k: v.kind for k, v in got.items()}
    assert kinds == {
        "f32": "float", "f64": "float", "f16": "float", "bf16": "float", "f8e4m3": "float", "f8e5m2": "float",
        "i64": "int", "i32": "int", "i16": "int", "i8": "int",
        "u8": "int", "u16": "int", "u32": "int", "u64": "int",
        "flag": "bool", "scalar": "float", "empty": "float", "num_batches_tracked": "int",
    }
    assert got["f8e4m3"].dtype == "F8_E4M3" and got["bf16"].dtype == "BF16" and got["flag"].dtype == "BOOL"
    assert got["scalar"].shape == () and got["empty"].shape == (0, 4)


def test_numpy_file_matches_safe_open(tmp_path):
    arrays = {
        "w": np.ones((2, 3), dtype=np.float32),
        "h": np.ones(4, dtype=np.float16),
        "d": np.ones((1, 1, 2), dtype=np.float64),
        "idx": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False]),
        "c": np.zeros(2, dtype=np.complex64),
    }
    path = tmp_path / "n.safetensors"
    np_save_file(arrays, str(path))
    got = read_safetensors_header(path)
    reference = safe_open_meta(path, "np")
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == reference
    assert got["w"] == TensorInfo(dtype="F32", shape=(2, 3), kind="float")
    assert got["idx"] == TensorInfo(dtype="I64", shape=(5,), kind="int")
    assert got["mask"] == TensorInfo(dtype="BOOL", shape=(2,), kind="bool")
    assert got["c"].kind == "complex"


def test_header_length_starting_with_pickle_byte_is_still_safetensors(tmp_path):
    # A header of exactly 128 bytes makes the file start with b"\x80", the pickle opcode.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    body = header + b" " * (128 - len(header))  # the format allows trailing spaces
    path = raw_safetensors(tmp_path / "p.safetensors", {}, b"\x00" * 8, header_bytes=body)
    assert path.read_bytes()[:1] == b"\x80"
    assert read_safetensors_header(path) == {"w": TensorInfo("F32", (2,), "float")}


def test_empty_safetensors_and_metadata_only(tmp_path):
    path = raw_safetensors(tmp_path / "e.safetensors", {"__metadata__": {"a": "b"}})
    assert read_safetensors_header(path) == {}


# --------------------------------------------------------------------------------------------------
# safetensors: invalid files
# --------------------------------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    torch_save_file({"a": torch.zeros(10), "b": torch.zeros(4)}, str(path))
    path.write_bytes(path.read_bytes()[:-4])
    err = invalid(read_safetensors_header, path)
    assert err.detail.startswith("not a safetensors file: ")
    assert "truncated" in err.detail
    assert "data section holds only" in err.detail
    assert EXPORT_HINT in err.detail


def test_truncated_inside_header(tmp_path):
    path = tmp_path / "t.safetensors"
    torch_save_file({"a": torch.zeros(10)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    err = invalid(read_safetensors_header, path)
    assert "but only 12 bytes follow it" in err.detail


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_shorter_than_length_field(tmp_path, content):
    path = tmp_path / "s.safetensors"
    path.write_bytes(content)
    err = invalid(read_safetensors_header, path)
    assert f"the file is {len(content)} bytes long" in err.detail


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b"{}")
    err = invalid(read_safetensors_header, path)
    assert "not a safetensors file: the header length field says 5000 bytes but only 2 bytes follow it" in err.detail


def test_header_length_over_limit(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    err = invalid(read_safetensors_header, path)
    assert "more than the 100000000-byte limit" in err.detail


def test_overlapping_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = raw_safetensors(tmp_path / "o.safetensors", header, b"\x00" * 12)
    err = invalid(read_safetensors_header, path)
    assert "tensors 'a' and 'b' overlap" in err.detail


def test_gap_in_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]},
    }
    path = raw_safetensors(tmp_path / "g.safetensors", header, b"\x00" * 16)
    err = invalid(read_safetensors_header, path)
    assert "gap of 4 unused bytes after tensor 'a' (before tensor 'b')" in err.detail


def test_gap_at_start_and_trailing_bytes(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "s.safetensors", header, b"\x00" * 4))
    assert "gap of 2 unused bytes at the start of the data" in err.detail
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "t.safetensors", header, b"\x00" * 5))
    assert "3 trailing bytes that belong to no tensor" in err.detail


def test_bad_dtype(tmp_path):
    header = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "d.safetensors", header, b"\x00" * 16))
    assert "tensor 'a' has unknown dtype 'F128'" in err.detail
    assert "BF16" in err.detail  # lists the known ones


def test_size_does_not_match_shape(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "z.safetensors", header, b"\x00" * 8))
    assert "tensor 'a' (F32 [3]) needs 12 bytes but its data_offsets [0, 8] span 8" in err.detail


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}, "a shape is a list of non-negative integers"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "a shape is a list of non-negative integers"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "a shape is a list of non-negative integers"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "expected [begin, end]"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "end before begin"),
        ({"dtype": "F32", "shape": [1]}, "tensor 'a' has no data_offsets"),
        ("nope", "the entry for tensor 'a' is not an object"),
    ],
)
def test_malformed_entries(tmp_path, entry, fragment):
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "m.safetensors", {"a": entry}, b"\x00" * 8))
    assert err.detail.startswith("not a safetensors file: ")
    assert fragment in err.detail


def test_non_json_header(tmp_path):
    path = raw_safetensors(tmp_path / "j.safetensors", {}, header_bytes=b"{not json")
    err = invalid(read_safetensors_header, path)
    assert "not a safetensors file: the header is not valid JSON" in err.detail


def test_non_utf8_and_non_object_header(tmp_path):
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "u.safetensors", {}, header_bytes=b'{"\xff":1}'))
    assert "the header is not UTF-8" in err.detail
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "l.safetensors", {}, header_bytes=b"[1, 2]"))
    assert "the header is JSON but a list, not an object" in err.detail


def test_duplicate_tensor_name(tmp_path):
    body = (
        b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
        b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    )
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "d.safetensors", {}, b"\x00\x00", header_bytes=body))
    assert "the header names 'a' twice" in err.detail


def test_bad_metadata(tmp_path):
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "m.safetensors", {"__metadata__": {"epochs": 3}}))
    assert "__metadata__ must be an object mapping strings to strings" in err.detail


def test_torch_save_zip_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, path)
    assert path.read_bytes()[:2] == b"PK"
    err = invalid(read_safetensors_header, path)
    assert err.detail.startswith("not a safetensors file: it looks like a zip archive, as written by torch.save")
    assert "PyTorch checkpoint" in err.detail
    assert EXPORT_HINT in err.detail


def test_legacy_torch_save_and_pickle_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    plain = tmp_path / "model.pkl"
    plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    for path in (legacy, plain):
        err = invalid(read_safetensors_header, path)
        assert err.detail.startswith("not a safetensors file: it looks like a pickle")
        assert "PyTorch checkpoint" in err.detail
        assert EXPORT_HINT in err.detail


def test_service_module_does_not_import_torch():
    code = "import sys, service.ingest; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# --------------------------------------------------------------------------------------------------
# PyTorch files: identified by content; state dicts converted by a child under weights_only=True
# --------------------------------------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.layer(x)


def _zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")
    return path


def test_identify_model_file_by_content(tmp_path):
    st = tmp_path / "weights.pt"  # the name says .pt, the bytes are safetensors
    torch_save_file({"w": torch.zeros(2)}, str(st))
    assert ingest.identify_model_file(st) == "safetensors"
    zipped = tmp_path / "a.safetensors"
    torch.save({"w": torch.zeros(2)}, zipped)
    legacy = tmp_path / "b.bin"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "c.pkl"
    raw.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    for path in (zipped, legacy, raw):
        assert ingest.identify_model_file(path) == "torch-checkpoint", path


def test_torchscript_and_torch_export_archives_are_refused_with_how_to_export(tmp_path):
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_Tiny()), str(scripted))
    err = invalid(ingest.identify_model_file, scripted)
    assert err.detail.startswith("the file is a TorchScript archive") and "code/ and constants.pkl" in err.detail
    assert 'save_file(model.state_dict(), "model.safetensors")' in err.detail
    exported = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(_Tiny(), (torch.randn(1, 3),)), str(exported))
    err = invalid(ingest.identify_model_file, exported)
    assert err.detail.startswith("the file is a torch.export archive") and "archive_format" in err.detail
    assert "torch.export.load can run code from a crafted archive" in err.detail
    assert 'save_file(model.state_dict(), "model.safetensors")' in err.detail


def test_classify_zip_entries():
    assert ingest.classify_zip_entries(["m/data.pkl", "m/data/0", "m/version"]) == "checkpoint"
    # A checkpoint-looking archive that also carries code is TorchScript, whatever else it holds.
    assert ingest.classify_zip_entries(["m/data.pkl", "m/code/__torch__.py"]) == "torchscript"
    assert ingest.classify_zip_entries(["m/data.pkl", "m/constants.pkl"]) == "torchscript"
    assert ingest.classify_zip_entries(["m/data.pkl", "m/archive_format"]) == "torch.export"
    assert ingest.classify_zip_entries(["m/models/model.json", "m/data/weights/weight_0"]) == "torch.export"
    assert ingest.classify_zip_entries(["x.npy", "y.npy"]) == "other"
    assert ingest.classify_zip_entries(["m/nested/data.pkl"]) == "other"


def test_other_zips_and_broken_zips_are_refused(tmp_path, monkeypatch):
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros(3))
    assert "not a PyTorch checkpoint" in invalid(ingest.identify_model_file, npz).detail
    truncated = tmp_path / "t.pt"
    torch.save({"w": torch.zeros(64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-120])
    assert "no zip directory" in invalid(ingest.identify_model_file, truncated).detail
    many = _zip(tmp_path / "many.pt", [f"m/data/{i}" for i in range(20)] + ["m/data.pkl"])
    monkeypatch.setattr(ingest, "MAX_ZIP_ENTRIES", 10)
    assert "lists 21 entries" in invalid(ingest.identify_model_file, many).detail


def test_zip_directory_size_reads_torch_zip64_end_records(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({f"w{i}": torch.zeros(i + 1) for i in range(5)}, path)
    with open(path, "rb") as fh:
        entries, directory_bytes = ingest._zip_directory_size(fh, path.stat().st_size)
    with zipfile.ZipFile(path) as archive:
        assert entries == len(archive.infolist()) and directory_bytes > 0


def _convert(source: Path, tmp_path: Path, **kwargs) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    target = tmp_path / "out.safetensors"
    ingest.convert_torch_checkpoint(source, target, max_output_bytes=kwargs.pop("max_output_bytes", 10**8), **kwargs)
    assert read_safetensors_header(target)
    return load_file(str(target))


def test_convert_state_dict_with_tied_and_viewed_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {"a": base[:6].view(2, 3), "b": base[:6].view(2, 3), "c": base[6:], "t": base.view(3, 4).t(),
             "steps": torch.tensor(5), "half": torch.ones(2, dtype=torch.bfloat16)}
    path = tmp_path / "tied.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    out = _convert(path, tmp_path)
    assert sorted(out) == sorted(state)
    for key, value in state.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value), key


def test_convert_refuses_what_is_not_a_state_dict(tmp_path):
    cases = {
        "whole": (_Tiny(), "_Tiny, which is code, not weights"),
        "list": ([torch.zeros(2)], "value of type list, not a state dict"),
        "value": ({"w": torch.zeros(2), "note": "hi"}, "'note' to a value of type str"),
        "key": ({1: torch.zeros(2)}, "keys must be parameter names"),
    }
    for name, (obj, fragment) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        err = invalid(_convert, path, tmp_path)
        assert fragment in err.detail and 'save_file(model.state_dict(), "model.safetensors")' in err.detail, name
        assert "weights_only=False" not in err.detail
        assert not (tmp_path / "out.safetensors").exists()


def test_convert_limits(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(4096)}, path)
    with pytest.raises(ingest.PayloadTooLarge, match="exceeds the limit of 1000 bytes"):
        _convert(path, tmp_path, max_output_bytes=1000)
    err = invalid(_convert, path, tmp_path, limits=ingest.ConversionLimits(timeout_s=0.05))
    assert "took longer than" in err.detail
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob("convert-*"))


# --------------------------------------------------------------------------------------------------
# check_weights_fit
# --------------------------------------------------------------------------------------------------

# The mismatch rules and wording are tested on arch.state_dict_mismatch
# (tests/unit/test_architectures.py); here only the wrapper: TensorInfo in, InvalidInput out.

EXPECTED = {
    "layers.0.weight": ((128, 64), "float"),
    "bn.num_batches_tracked": ((), "int"),
}


def test_fit_ok():
    tensors = {
        "layers.0.weight": TensorInfo(dtype="BF16", shape=(128, 64), kind="float"),
        "bn.num_batches_tracked": TensorInfo(dtype="I64", shape=(), kind="int"),
    }
    assert check_weights_fit(tensors, EXPECTED, "mlp") is None


def test_fit_raises_invalid_input_with_the_mismatch_and_dtypes():
    tensors = {
        "layers.0.weight": TensorInfo(dtype="F32", shape=(128, 30), kind="float"),
        "bn.num_batches_tracked": TensorInfo(dtype="F32", shape=(), kind="float"),
        "extra": TensorInfo(dtype="U8", shape=(3,), kind="int"),
    }
    err = invalid(check_weights_fit, tensors, EXPECTED, "mlp")
    assert err.detail == (
        "weights do not fit architecture mlp: 1 key is not part of the architecture: extra; "
        "layers.0.weight has shape [128, 30], the architecture expects [128, 64]; "
        "bn.num_batches_tracked is a float tensor, the architecture expects an int tensor"
    )
    assert err.errors == [
        {"key": "extra", "problem": "unexpected", "shape": [3], "kind": "int", "dtype": "U8"},
        {
            "key": "layers.0.weight",
            "problem": "shape_mismatch",
            "shape": [128, 30],
            "expected_shape": [128, 64],
            "dtype": "F32",
        },
        {
            "key": "bn.num_batches_tracked",
            "problem": "kind_mismatch",
            "kind": "float",
            "expected_kind": "int",
            "dtype": "F32",
        },
    ]


# --------------------------------------------------------------------------------------------------
# npz datasets
# --------------------------------------------------------------------------------------------------


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
    assert "group_g has shape [4]; it must be 1-D with one value per row of x (3)" in invalid(read_npz_dataset, path).detail


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
    assert "the .npz has no array 'x' (it has: y, group_g)" in invalid(read_npz_dataset, path).detail


def test_npz_bad_attribute_name(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.ones((2, 1)), y=np.zeros(2, dtype=int), **{"group_skin tone": np.arange(2)})
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


def test_npz_zip_bomb_guard(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.ones((100, 4)), y=np.zeros(100, dtype=int), group_g=np.arange(100))
    err = invalid(read_npz_dataset, path, max_uncompressed_bytes=1000)
    assert "more than the 1000 allowed" in err.detail


# --------------------------------------------------------------------------------------------------
# CSV datasets
# --------------------------------------------------------------------------------------------------


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
    assert "the CSV has no column 'target', 'bmi'; available columns: 'height', 'label', 'age', 'weight', 'sex'" in err.detail
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
    assert "feature column 'x1' has '' in row 3" in invalid(read_csv_dataset, path, label="y", features=None, groups=["g"]).detail
    path = write_csv(tmp_path / "e.csv", "x1,y,g\n1,0,a\n2,1,b\nnan,1,b\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"])
    assert "feature column 'x1' has 'nan' in row 4, which is not a finite float32 number" in err.detail


def test_csv_row_numbers_across_chunks_and_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "_CSV_CHUNK_ROWS", 2)
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
    monkeypatch.setattr(ingest, "MAX_CSV_BYTES", 5)
    err = invalid(read_csv_dataset, ok, label="y", features=None, groups=["g"])
    assert "more than the 5 bytes a CSV may have; upload the dataset as .npz" in err.detail


def test_csv_bad_group_column_name(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x,y,skin tone\n1,0,a\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["skin tone"])
    assert "'skin tone' cannot be a group attribute name" in err.detail and "rename the CSV column" in err.detail


# --------------------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------------------


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

    x, y, groups = load_dataset_arrays(directory, ["sex"])
    assert isinstance(x, np.memmap) and isinstance(y, np.memmap) and isinstance(groups["sex"], np.memmap)
    assert x.dtype == np.float32 and y.dtype == np.int64 and groups["sex"].dtype == np.int32
    np.testing.assert_array_equal(x, ds.x)
    assert y.tolist() == [1, 0, 2, 1]
    assert list(groups) == ["sex"] and groups["sex"].tolist() == [0, 1, 1, -1]
    with pytest.raises(ValueError):
        x[0, 0, 0] = 1.0  # read-only mapping


def test_csv_to_storage_end_to_end(tmp_path):
    path = write_csv(tmp_path / "d.csv", HAPPY)
    ds = read_csv_dataset(path, label="label", features=None, groups=["age", "sex"])
    summary = save_dataset(ds, tmp_path / "store")
    assert summary["groups"]["age"] == {"names": ["2", "9", "10"], "sizes": [1, 1, 1], "missing": 1}
    assert summary["groups"]["sex"] == {"names": ["f", "m"], "sizes": [2, 1], "missing": 1}
    x, y, groups = load_dataset_arrays(tmp_path / "store", ["age", "sex"])
    assert y.tolist() == [1, 2, 1, 0] and groups["age"].tolist() == [2, 1, -1, 0]


def test_load_unknown_attribute(tmp_path):
    ds = ParsedDataset(
        x=np.zeros((1, 1), np.float32), y=np.zeros(1, np.int64), classes=["0"],
        groups={"sex": GroupColumn(codes=np.zeros(1, np.int32), names=["f"])},
    )
    save_dataset(ds, tmp_path)
    err = invalid(load_dataset_arrays, tmp_path, ["race", "sex"])
    assert err.detail == "the dataset has no group attribute 'race'; it has: sex"


def test_label_ids_beyond_class_limit(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x,y,g\n1,0,a\n2,123456,b\n")
    err = invalid(read_csv_dataset, path, label="y", features=None, groups=["g"])
    assert "the largest label in the label column 'y' is 123456" in err.detail
    assert "store them as strings" in err.detail
