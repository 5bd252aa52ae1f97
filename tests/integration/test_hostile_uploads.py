"""Hostile uploads that are small on the wire but would cost the API process memory or CPU (issue #16):
each is refused with a problem+json that names the limit (a setting), quickly, with the API's resident memory
bounded, its error body small, and nothing stored (no row, no blob, no temporary file, no dataset directory)."""

from __future__ import annotations

import io
import json
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable

import numpy as np
import psutil
import pytest

from service.ingest.limits import MAX_COLUMNS, MAX_DECODED_BYTES, MAX_TENSOR_NAME_BYTES, MAX_TENSORS
from tests.integration.stack import Stack, assert_problem, start_stack

MiB = 1024**2
RSS_GROWTH_BOUND = 100 * MiB  # the reader may touch a few MB; any of these bombs decoded would take GBs
ERROR_BODY_BOUND = 4096


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("hostile"), with_worker=False)
    with stack.client() as client:
        yield stack, client
    stack.stop()


def stored(stack: Stack) -> dict:
    blobs = stack.var_dir / "blobs"
    with sqlite3.connect(stack.var_dir / "pruneaudit.sqlite") as db:
        rows = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("models", "datasets")}
    return {
        **rows,
        **{part: sorted(p.name for p in (blobs / part).rglob("*")) for part in ("sha256", "tmp", "datasets")},
    }


def refused_within_bounds(stack: Stack, send: Callable[[], object], status: int, *fragments: str) -> dict:
    """Send the request while sampling the API's resident memory; check the answer and that nothing was kept."""
    before = stored(stack)
    api = psutil.Process(stack.processes["api"].pid)
    baseline, peak, done = api.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], api.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = send()
    finally:
        done.set()
        sampler.join()
    body = assert_problem(response, status, *fragments)
    assert len(response.content) < ERROR_BODY_BOUND, len(response.content)
    assert peak[0] - baseline < RSS_GROWTH_BOUND, f"API resident memory grew {(peak[0] - baseline) / MiB:.0f} MiB"
    assert stored(stack) == before
    return body


def upload_dataset(client, content: bytes, filename: str = "d.npz", **form):
    return client.post("/v1/datasets", files={"file": (filename, content)}, data=form)


def upload_weights(client, content: bytes):
    architecture = {"name": "mlp", "in_features": 64, "hidden": [128, 64], "num_classes": 10}
    return client.post(
        "/v1/models",
        files={"weights": ("m.safetensors", content)},
        data={"architecture": json.dumps(architecture)},
    )


# -- .npz ----------------------------------------------------------------------------------------------


def npy_header(shape: tuple[int, ...]) -> bytes:
    text = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    text += b" " * (127 - 10 - len(text)) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def one_entry_zip(name: str, deflated: bytes, size: int, crc: int) -> bytes:
    """A zip archive of one deflated entry, written field by field (zipfile cannot take deflated bytes)."""
    encoded = name.encode()
    fields = (20, 0, 8, 0, 0x21, crc, len(deflated), size, len(encoded))
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + encoded
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, 0, 0, 0, 0, 0) + encoded
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(deflated), 0)
    return local + deflated + central + end


def zeros_bomb(shape: tuple[int, ...]) -> bytes:
    """An .npz whose x is `shape` float32 zeros, deflated: one full-flush block of 1 MiB of zeros, repeated.
    Its CRC is that of the header alone: a reader that decompressed it would hold every byte before noticing."""
    header, data_bytes = npy_header(shape), 4 * shape[0] * shape[1]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH) == block  # independent blocks
    stream += block * (data_bytes // MiB - 2) + compressor.compress(bytes(data_bytes % MiB)) + compressor.flush()
    return one_entry_zip("x.npy", stream, len(header) + data_bytes, zlib.crc32(header))


def test_a_decompression_bomb_under_the_upload_cap_is_413_before_decompressing(api):
    # Item 1: 14.7M x 64 float32 zeros, 3.5 GiB declared, a few MB on the wire (was accepted after 29 s, 4.9 GB RSS).
    stack, client = api
    bomb = zeros_bomb((14_700_000, 64))
    assert len(bomb) < 8 * MiB
    live = zlib.decompressobj(-15)
    data_start = 30 + len("x.npy")  # after the local file header
    assert live.decompress(bomb[data_start : data_start + 64 * 1024], 4 * MiB).count(0) > 3 * MiB  # it is live
    started = time.monotonic()
    body = refused_within_bounds(
        stack,
        lambda: upload_dataset(client, bomb),
        413,
        "the .npz archive expands to 3763200128 bytes",
        f"more than the {MAX_DECODED_BYTES} bytes one dataset may take (setting max_decoded_bytes)",
    )
    assert time.monotonic() - started < 10, body


@pytest.mark.parametrize("shape", [(10**7, 10**5), (10**12,)], ids=["4e12 bytes", "4 TB"])
def test_npz_headers_that_declare_terabytes_are_413(api, shape):
    # Items 2d and 2e: numpy would try to allocate what the header declares (was a 500).
    stack, client = api
    header = npy_header(shape)
    npz = one_entry_zip("x.npy", zlib.compress(header)[2:-4], len(header), zlib.crc32(header))
    refused_within_bounds(
        stack,
        lambda: upload_dataset(client, npz),
        413,
        f"array 'x' declares shape {list(shape)} of float32",
        "(setting max_decoded_bytes)",
    )


def small_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ones((100, 4), dtype=np.float32), y=np.arange(100) % 2, group_g=np.arange(100) % 3)
    return buffer.getvalue()


def test_the_decode_budget_of_the_process_is_its_setting(tmp_path_factory):
    # Item 1's second half: two bombs at once took 9.2 GB; all decoding in one process now shares one budget.
    stack = start_stack(
        tmp_path_factory.mktemp("budget"), with_worker=False, settings={"PRUNEAUDIT_MAX_DECODING_BYTES": "1000"}
    )
    try:
        with stack.client() as client:
            refused_within_bounds(
                stack,
                lambda: upload_dataset(client, small_npz()),
                413,
                "more than the 1000 bytes this server decodes at once (setting max_decoding_bytes)",
            )
    finally:
        stack.stop()


# -- safetensors ---------------------------------------------------------------------------------------


def safetensors_with_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    "header, fragment",
    [
        (b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests JSON arrays or objects too deeply"),
        (
            b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
            "a 5000-digit integer, too large for any size or offset",
        ),
        (
            json.dumps(
                {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS * 2)}
            ).encode(),
            f"more than {MAX_TENSORS} tensors, more than any model here has (setting max_tensors)",
        ),
        (
            json.dumps({"w" * 10 * MiB: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode(),
            f"longer than the {MAX_TENSOR_NAME_BYTES} bytes a tensor name may have (setting max_tensor_name_bytes)",
        ),
    ],
    ids=["nesting bomb", "5000-digit shape", "20,000 zero-size tensors", "a 10 MB name"],
)
def test_safetensors_headers_that_cost_parsing_are_422_with_a_small_body(api, header, fragment):
    # Items 2c and 6: were a 500 (RecursionError, ValueError), or 39-46 s, 1.1 GB and an 82 MB error body.
    stack, client = api
    started = time.monotonic()
    refused_within_bounds(stack, lambda: upload_weights(client, safetensors_with_header(header)), 422, fragment)
    assert time.monotonic() - started < 10


# -- CSV -----------------------------------------------------------------------------------------------


def test_a_csv_naming_40000_feature_columns_is_422_at_once(api):
    # Item 5: a 269 KB upload cost 25.5 s of CPU in a quadratic duplicate check.
    stack, client = api
    names = [f"c{i}" for i in range(40_000)]
    csv = (",".join(["y", "g", *names]) + "\n" + ",".join(["1", "a"] + ["0"] * 40_000) + "\n").encode()
    api_process = psutil.Process(stack.processes["api"].pid)
    cpu_before = sum(api_process.cpu_times()[:2])
    refused_within_bounds(
        stack,
        lambda: upload_dataset(client, csv, "d.csv", label="y", groups="g", features=",".join(names)),
        422,
        f"features names 40000 columns, more than the {MAX_COLUMNS} a dataset may have (setting max_columns)",
    )
    assert sum(api_process.cpu_times()[:2]) - cpu_before < 2
