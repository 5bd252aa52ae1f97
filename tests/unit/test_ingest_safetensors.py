"""service.ingest.safetensors: header validation (pre-checks, then safe_open) and the architecture fit."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from service.ingest import safetensors as safetensors_ingest
from service.ingest.limits import MAX_HEADER_BYTES, MAX_TENSOR_NAME_BYTES, IngestLimits
from service.ingest.safetensors import TensorInfo, check_weights_fit, read_safetensors_header
from tests.unit.ingest_support import EXPORT_HINT, invalid


def raw_safetensors(path: Path, header: dict, data: bytes = b"", *, header_bytes: bytes | None = None) -> Path:
    body = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def safe_open_meta(path: Path, framework: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    with safe_open(str(path), framework=framework) as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys() but is not iterable: `in f` is a TypeError
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
        "f32": "float",
        "f64": "float",
        "f16": "float",
        "bf16": "float",
        "f8e4m3": "float",
        "f8e5m2": "float",
        "i64": "int",
        "i32": "int",
        "i16": "int",
        "i8": "int",
        "u8": "int",
        "u16": "int",
        "u32": "int",
        "u64": "int",
        "flag": "bool",
        "scalar": "float",
        "empty": "float",
        "num_batches_tracked": "int",
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
    assert "the tensors' data_offsets do not end where the file does: it is truncated" in err.detail
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
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    err = invalid(read_safetensors_header, path)
    assert f"more than the {MAX_HEADER_BYTES}-byte limit (setting max_safetensors_header_bytes)" in err.detail


def test_overlapping_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = raw_safetensors(tmp_path / "o.safetensors", header, b"\x00" * 12)
    err = invalid(read_safetensors_header, path)
    assert "tensor 'b' has data_offsets that do not start where the tensor before it ends" in err.detail
    assert "without gaps or overlaps" in err.detail


def test_gap_in_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]},
    }
    path = raw_safetensors(tmp_path / "g.safetensors", header, b"\x00" * 16)
    err = invalid(read_safetensors_header, path)
    assert "tensor 'b' has data_offsets that do not start where the tensor before it ends" in err.detail


def test_gap_at_start_and_trailing_bytes(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "s.safetensors", header, b"\x00" * 4))
    assert "tensor 'a' has data_offsets that do not start where the tensor before it ends" in err.detail
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "t.safetensors", header, b"\x00" * 5))
    assert "or has trailing bytes that belong to no tensor" in err.detail


def test_bad_dtype(tmp_path):
    header = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "d.safetensors", header, b"\x00" * 16))
    assert "unknown dtype `F128`, expected one of" in err.detail
    assert "BF16" in err.detail  # lists the known ones


def test_size_does_not_match_shape(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "z.safetensors", header, b"\x00" * 8))
    assert "a tensor's data_offsets span a different number of bytes than its dtype and shape need" in err.detail


@pytest.mark.parametrize(
    "entry, fragment",
    [
        (
            {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]},
            "invalid value: integer `-1`, expected a non-negative integer (header line 1, column 62)",
        ),
        (
            {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
            "invalid type: boolean `true`, expected a non-negative integer",
        ),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, 'invalid type: string "2", expected a list'),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "invalid length 1, expected [begin, end]"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "each [begin, end] with begin <= end"),
        ({"dtype": "F32", "shape": [1]}, "missing field `data_offsets`"),
        ("nope", 'invalid type: string "nope", expected a tensor entry {dtype, shape, data_offsets}'),
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
    err = invalid(
        read_safetensors_header, raw_safetensors(tmp_path / "d.safetensors", {}, b"\x00\x00", header_bytes=body)
    )
    assert "the header names 'a' twice" in err.detail
    # safe_open keeps the last of two identical entries; the pre-check refuses them as well.
    entry = b'{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    body = b'{"a": ' + entry + b', "a": ' + entry + b"}"
    path = raw_safetensors(tmp_path / "e.safetensors", {}, b"\x00", header_bytes=body)
    err = invalid(read_safetensors_header, path)
    assert "the header names 'a' twice" in err.detail


def test_json_nesting_bomb_and_huge_integers(tmp_path):
    body = b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "n.safetensors", {}, header_bytes=body))
    assert "the header nests JSON arrays or objects too deeply" in err.detail
    body = b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}'
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "i.safetensors", {}, header_bytes=body))
    assert "the header holds a 5000-digit integer, too large for any size or offset" in err.detail


def test_tensor_count_is_capped(tmp_path):
    limits = IngestLimits(max_tensors=50)
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}  # zero-size: no data bytes needed
    ok = raw_safetensors(tmp_path / "ok.safetensors", {f"t{i}": empty for i in range(50)})
    assert len(read_safetensors_header(ok, limits)) == 50
    many = raw_safetensors(tmp_path / "many.safetensors", {f"t{i}": empty for i in range(51)})
    assert "the header describes more than 50 tensors, more than any model here has (setting max_tensors)" in (
        invalid(read_safetensors_header, many, limits).detail
    )


def test_long_names_are_refused_and_errors_stay_small(tmp_path):
    # Item 6 of issue #16: 10 MB names gave a 42 MB error body.
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    path = raw_safetensors(tmp_path / "n.safetensors", {"w" * 1_000_000: empty})
    err = invalid(read_safetensors_header, path)
    assert len(err.detail) < 1_000 and not err.errors
    assert "a name of 1000000 characters, 'wwww" in err.detail
    assert f"longer than the {MAX_TENSOR_NAME_BYTES} bytes a tensor name may have" in err.detail
    # A dtype the format lacks is echoed by safe_open's parser: the reason is cut short.
    path = raw_safetensors(tmp_path / "d.safetensors", {"a": dict(empty, dtype="X" * 100_000)})
    assert len(invalid(read_safetensors_header, path).detail) < 1_000


def test_weights_fit_errors_list_a_bounded_number_of_entries():
    empty = TensorInfo(dtype="F32", shape=(0,), kind="float")
    found = {f"extra.{i}": empty for i in range(5_000)}
    err = invalid(check_weights_fit, found, {"w": ((2,), "float")}, "mlp")
    assert len(err.errors) == safetensors_ingest.MAX_ERRORS_LISTED and len(err.detail) < 1_000


@pytest.mark.parametrize(
    "entry, data, fragment",
    [
        ({"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}, b"\x00\x00", "does not fill a whole number of bytes"),
        (
            {"dtype": "F32", "shape": [2**32, 2**32, 2**32], "data_offsets": [0, 0]},
            b"",
            "a tensor's shape is too large: its byte size overflows",
        ),
    ],
)
def test_sizes_safe_open_rejects(tmp_path, entry, data, fragment):
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "s.safetensors", {"a": entry}, data))
    assert fragment in err.detail


def test_bad_metadata(tmp_path):
    err = invalid(read_safetensors_header, raw_safetensors(tmp_path / "m.safetensors", {"__metadata__": {"epochs": 3}}))
    assert "invalid type: integer `3`, expected a string (header line 1, column 29)" in err.detail


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


# --------------------------------------------------------------------------------------------------
# check_weights_fit
# --------------------------------------------------------------------------------------------------

# The mismatch rules and wording are tested on arch.mismatch.state_dict_mismatch
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
