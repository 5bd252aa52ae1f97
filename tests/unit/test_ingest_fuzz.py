"""Property-based fuzzing of the upload readers: the safetensors header reader, the .npz and CSV dataset
readers and the ONNX importer's checks (parse, data inside the file, checker), on valid files mutated
byte by byte and on files built from hostile parts. Each either accepts its input or refuses it with the
documented error (InvalidInput or PayloadTooLarge; Refused in the ONNX child); any other exception
fails. `make test` runs 300 examples of each (profile ingest-quick); `make fuzz` runs the
ingest-fuzz profile, 20,000 each (PRUNEAUDIT_FUZZ_PROFILE picks one)."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.errors import InvalidInput, PayloadTooLarge
from service.ingest.csv import read_csv_dataset
from service.ingest.limits import IngestLimits
from service.ingest.npz import read_npz_dataset
from service.ingest.safetensors import read_safetensors_header

settings.register_profile(
    "ingest-quick",
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ingest-fuzz",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile(os.environ.get("PRUNEAUDIT_FUZZ_PROFILE", "ingest-quick"))
REFUSALS = (InvalidInput, PayloadTooLarge)
LIMITS = IngestLimits(
    max_decoded_bytes=1 << 20, max_columns=20, max_header_bytes=1 << 16, max_tensors=50, max_tensor_name_bytes=64
)


@st.composite
def mutated(draw, seeds: st.SearchStrategy[bytes]) -> bytes:
    """A seed with a few bytes overwritten, some inserted, and perhaps cut short."""
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(0, 6))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=16))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def written(data: bytes, suffix: str) -> Path:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


def accepted_or_refused(read, data: bytes, suffix: str, refusals: tuple[type[Exception], ...] = REFUSALS):
    path = written(data, suffix)
    try:
        return read(path)
    except refusals:
        return None
    finally:
        path.unlink()


# -- safetensors ---------------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F4", "F8_E4M3", "C64", "X", ""]
integers = st.one_of(st.integers(-3, 70), st.integers(-(2**70), 2**70))
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(DTYPES), st.text(max_size=8)),
        "shape": st.lists(integers, max_size=4),
        "data_offsets": st.lists(integers, max_size=3),
    },
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
headers = st.dictionaries(
    st.one_of(st.sampled_from(["a", "b", "__metadata__", "w" * 65]), st.text(max_size=8)),
    st.one_of(entries, json_values),
    max_size=6,
)


@st.composite
def safetensors_files(draw) -> bytes:
    text = json.dumps(draw(headers)).encode()
    length = draw(st.one_of(st.just(len(text)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + text + draw(st.binary(max_size=64))


def valid_safetensors() -> bytes:
    from safetensors.numpy import save

    return save({"a": np.zeros((2, 3), dtype=np.float32), "b": np.arange(4, dtype=np.int64)})


@FUZZ
@given(st.one_of(safetensors_files(), mutated(st.just(valid_safetensors()))))
def test_safetensors_header_reader(data):
    accepted_or_refused(lambda path: read_safetensors_header(path, LIMITS), data, ".safetensors")


# -- npz -----------------------------------------------------------------------------------------------

DESCRS = ["<f4", "<f8", "|b1", "<i8", "|u1", "<U3", "|S2", "|O", "<c8", "|V0", "|S0", ">i4", "<M8[s]", "<f2"]


def npy_header(descr, fortran_order, shape) -> bytes:
    text = repr({"descr": descr, "fortran_order": fortran_order, "shape": shape}).encode()
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


@st.composite
def crafted_npz(draw) -> bytes:
    """Members with hostile .npy headers: odd dtypes, negative or huge dimensions, too few or many bytes."""
    buffer = io.BytesIO()
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", method) as archive:
        warnings.simplefilter("ignore")  # two entries of one name: a case the reader must refuse
        for name in draw(st.lists(st.sampled_from(["x", "y", "group_g", "group_", "z", "group_ä"]), max_size=4)):
            descr = draw(st.one_of(st.sampled_from(DESCRS), st.text(max_size=6), st.lists(st.text(max_size=3))))
            shape = tuple(draw(st.lists(st.one_of(st.integers(-2, 6), st.integers(0, 10**13)), max_size=3)))
            header = npy_header(descr, draw(st.booleans()), shape)
            archive.writestr(name + ".npy", header + draw(st.binary(max_size=48)))
    return buffer.getvalue()


@st.composite
def valid_npz(draw) -> bytes:
    rows = draw(st.integers(1, 5))
    x = draw(st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.float16, np.bool_]))
    labels = draw(
        st.sampled_from(
            [
                np.arange(rows) % 2,
                np.array(["a", "b", " ", "c", "a"][:rows]),
                np.array([b"\xff", b"a", b"", b"b", b"c"][:rows]),  # found by a review: bytes that are not ASCII
                np.arange(rows) + 0.5,
                -np.arange(rows),
            ]
        )
    )
    group = draw(
        st.sampled_from(
            [
                np.arange(rows),
                np.array(["f", "NA", "m", "", "f"][:rows]),
                np.array([b"f", b"\xe9", b"m", b"", b"f"][:rows]),
                np.full(rows, np.nan),
            ]
        )
    )
    arrays = {"x": np.ones((rows, 3), dtype=x), "y": labels, "group_g": group}
    buffer = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def one_array_npz(descr) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", npy_header(descr, False, (1,)) + b"\0" * 4)
    return buffer.getvalue()


@FUZZ
@given(st.one_of(crafted_npz(), valid_npz(), mutated(valid_npz())))
@example(one_array_npz("(,)f4"))  # found by fuzzing: numpy's dtype parser raised SyntaxError
def test_npz_reader(data):
    accepted_or_refused(lambda path: read_npz_dataset(path, max_decoded_bytes=LIMITS.max_decoded_bytes), data, ".npz")


# -- CSV -----------------------------------------------------------------------------------------------

csv_text = st.text(alphabet=st.sampled_from(list('ab01.,-e \n\r";\tNA') + ["ä", "\x00", "\ufeff"]), max_size=200)
columns = st.sampled_from(["a", "b", "0", "", "a b", "ä"])


@FUZZ
@given(
    st.one_of(csv_text.map(str.encode), mutated(st.just(b"a,b,0\n1,x,2\n0,y,3.5\n"))),
    columns,
    st.one_of(st.none(), st.lists(columns, max_size=4)),
    st.lists(columns, max_size=3),
)
def test_csv_reader(data, label, features, groups):
    accepted_or_refused(
        lambda path: read_csv_dataset(
            path, label=label, features=features, groups=groups, max_columns=LIMITS.max_columns
        ),
        data,
        ".csv",
    )


# -- ONNX (the checks of the child importer, worker/import_onnx.py) --------------------------------------


def onnx_model(initializer=None) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weight = initializer or numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@st.composite
def odd_initializers(draw) -> bytes:
    """A tensor of any declared type and shape, holding any bytes."""
    from onnx import TensorProto

    tensor = TensorProto(name="w", data_type=draw(st.integers(0, 40)), raw_data=draw(st.binary(max_size=64)))
    tensor.dims.extend(draw(st.lists(st.integers(-3, 2**40), max_size=3)))
    return onnx_model(tensor)


def initializer_of_type(data_type: int) -> bytes:
    from onnx import TensorProto

    return onnx_model(TensorProto(name="w", data_type=data_type, dims=[1], raw_data=b"\0" * 4))


@FUZZ
@given(st.one_of(mutated(st.just(onnx_model())), odd_initializers()))
# Found by fuzzing: a data type onnx's helper lacks was a KeyError, one its checker lacks a ValueError.
@example(initializer_of_type(99))
@example(initializer_of_type(29))
def test_onnx_checks(data):
    from worker.convert_checkpoint import Refused
    from worker.import_onnx import check, check_data_inside, parse

    try:
        model = parse(data)
        check_data_inside(model)
        check(model)
    except Refused:
        pass
