"""Uploads are data, never code: crafted pickles and archives whose loading would create a marker file
are refused (4xx problem+json saying what was found and how to export safetensors), the marker never
appears and nothing is stored; a weights-only .pt state dict is accepted through
torch.load(weights_only=True) and audits exactly like its safetensors twin; bodies over the byte cap
get 413 before they are read."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shlex
import socket
import sqlite3
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tests.integration.stack import Stack, assert_problem, start_stack, wait_for_audit

EXPORT = 'save_file(model.state_dict(), "model.safetensors")'


class TouchOnLoad:
    """Unpickling this runs `touch MARKER`: the classic pickle payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class ModelThatTouchesOnLoad(torch.nn.Module):
    """A whole pickled model (torch.save(model)) whose unpickling by an unsafe loader creates the marker."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = str(marker)
        self.temperature = 2.0

    def __setstate__(self, state):
        Path(state["marker"]).touch()
        super().__setstate__(state)


def whole_model(marker: Path) -> ModelThatTouchesOnLoad:
    return ModelThatTouchesOnLoad(marker)


def saved(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


class _PlainUnpickler(pickle.Unpickler):
    def persistent_load(self, pid):
        if pid[0] == "module":  # the legacy format records a module's class next to its source
            return pid[1]
        raise AssertionError(f"unexpected storage {pid}")  # the payloads hold no tensors


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy format: magic, protocol, sys info, then the object


def unpickle_like_an_unsafe_loader(payload: bytes) -> None:
    """What an unrestricted unpickler (pickle.load, or torch.load with weights_only off) does with the
    object inside the bytes: a raw pickle, torch's legacy stream, or a torch.save zip's data.pkl."""
    if payload[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            payload = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    unpickler = _PlainUnpickler(io.BytesIO(payload))
    if unpickler.load() == LEGACY_MAGIC:
        unpickler.load(), unpickler.load(), unpickler.load()


def crafted_payloads(marker: Path) -> dict[str, bytes]:
    return {
        "raw pickle, protocol 2": pickle.dumps(TouchOnLoad(marker), protocol=2),
        "raw pickle, protocol 5": pickle.dumps(TouchOnLoad(marker), protocol=5),
        "torch.save zip holding the payload": saved({"layers.0.weight": TouchOnLoad(marker)}),
        "legacy torch.save holding the payload": saved(
            {"w": TouchOnLoad(marker)}, _use_new_zipfile_serialization=False
        ),
        "torch.save of a whole model": saved(whole_model(marker)),
        "legacy torch.save of a whole model": saved(whole_model(marker), _use_new_zipfile_serialization=False),
    }


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def forward(self, x):
        return torch.relu(self.layer(x))


def torchscript_archive() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(TinyNet()), buffer)
    return buffer.getvalue()


def torch_export_archive(tmp_path: Path) -> bytes:
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(TinyNet(), (torch.randn(1, 4),)), str(path))
    return path.read_bytes()


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("upload-safety"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack):
    with stack.client() as client:
        yield client


def stored(stack: Stack) -> tuple[list[str], int, list[str]]:
    """(blob files, model rows, leftover temporary files): what an upload leaves behind."""
    blobs = stack.var_dir / "blobs"
    files = (
        sorted(str(p.relative_to(blobs)) for p in (blobs / "sha256").rglob("*") if p.is_file())
        if (blobs / "sha256").exists()
        else []
    )
    with sqlite3.connect(stack.var_dir / "pruneaudit.sqlite") as db:
        rows = db.execute("SELECT count(*) FROM models").fetchone()[0]
    tmp = sorted(p.name for p in (blobs / "tmp").iterdir()) if (blobs / "tmp").exists() else []
    return files, rows, tmp


def upload(client, digits_case, content: bytes, filename: str = "model.pt"):
    return client.post(
        "/v1/models",
        files={"weights": (filename, content)},
        data={"architecture": json.dumps(digits_case.architecture)},
    )


# --------------------------------------------------------------------------------------------------
# code in uploads never runs
# --------------------------------------------------------------------------------------------------


def test_the_crafted_payloads_are_live(tmp_path):
    """Guards the tests below: each payload really does create its marker when unpickled unsafely."""
    for label, payload in crafted_payloads(tmp_path / "control").items():
        (tmp_path / "control").unlink(missing_ok=True)
        unpickle_like_an_unsafe_loader(payload)
        assert (tmp_path / "control").exists(), label


def test_pickles_that_would_run_code_are_refused_and_never_run(stack, client, digits_case, tmp_path):
    marker = tmp_path / "MARKER"
    before = stored(stack)
    for i, (label, payload) in enumerate(crafted_payloads(marker).items()):
        filename = ("model.pt", "model.safetensors")[i % 2]  # detection is by content, not by name
        body = assert_problem(upload(client, digits_case, payload, filename), 422, "weights_only=True", EXPORT)
        assert "weights_only=False" not in body["detail"], (label, body)
        assert not marker.exists(), f"{label}: loading the upload ran its code"
    assert stored(stack) == before


def test_whole_model_refusal_names_what_was_found(client, digits_case, tmp_path):
    body = assert_problem(upload(client, digits_case, saved(whole_model(tmp_path / "m"))), 422)
    assert "ModelThatTouchesOnLoad" in body["detail"] and "whole pickled model" in body["detail"]
    body = assert_problem(upload(client, digits_case, pickle.dumps(TouchOnLoad(tmp_path / "m"), protocol=2)), 422)
    assert "system" in body["detail"] and "code, not weights" in body["detail"]


def test_torchscript_archive_is_refused_unloaded(stack, client, digits_case):
    before = stored(stack)
    body = assert_problem(upload(client, digits_case, torchscript_archive()), 422, "TorchScript archive", EXPORT)
    assert "code/" in body["detail"] and "constants.pkl" in body["detail"]
    assert stored(stack) == before


def test_torch_export_archive_is_refused_unloaded(stack, client, digits_case, tmp_path):
    before = stored(stack)
    archive = torch_export_archive(tmp_path)
    for filename in ("model.pt2", "model.safetensors"):
        assert_problem(
            upload(client, digits_case, archive, filename),
            422,
            "torch.export archive",
            "torch.export.load can run code from a crafted archive",
            EXPORT,
        )
    assert stored(stack) == before


def test_the_server_source_never_loads_unsafely():
    root = Path(__file__).resolve().parents[2]
    forbidden = (
        "weights_only=" + "False",
        "torch.jit." + "load",
        "torch.export." + "load(",
        "pickle." + "load",
        "allow_pickle=" + "True",
        "jit.load(",
        "torch." + "package",
    )
    for path in [*root.glob("service/**/*.py"), *root.glob("worker/**/*.py")]:
        text = path.read_text()
        for needle in forbidden:
            assert needle not in text, f"{path.relative_to(root)} contains {needle}"
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.relative_to(root)}: {call}"


# --------------------------------------------------------------------------------------------------
# weights-only .pt state dicts are accepted, as safetensors
# --------------------------------------------------------------------------------------------------


def digits_tensors(digits_case) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in digits_case.state.items()}


def comparable(report: dict) -> dict:
    """The report's findings, without ids, links and wall-clock figures."""

    def strip(value):
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if k
                not in (
                    "id",
                    "audit_id",
                    "weights_url",
                    "created_at",
                    "generated_at",
                    "latency_ms",
                    "model_id",
                    "dataset_id",
                    "report_url",
                    "recipe",
                    "seconds",
                )
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return {"dense": strip(report["dense"]), "runs": strip(report["runs"])}


def diff(a, b, where="") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in diff(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [[where, a, b]]


def test_weights_only_state_dict_is_accepted_and_audits_like_safetensors(stack, client, digits_case):
    reference = digits_case.upload_model(client)
    assert reference.status_code == 201, reference.text
    tensors = digits_tensors(digits_case)
    variants = {
        "state dict": saved(tensors),
        "state dict, legacy format": saved(tensors, _use_new_zipfile_serialization=False),
        "training checkpoint": saved({"state_dict": tensors, "epoch": 7, "best_accuracy": 0.97}),
        "a parameter that is a view into a larger storage": saved(
            dict(
                tensors,
                **{
                    "layers.0.weight": torch.nn.Parameter(
                        torch.cat([tensors["layers.0.weight"], tensors["layers.0.weight"]])[
                            : len(tensors["layers.0.weight"])
                        ]
                    )
                },
            )
        ),
    }
    models = {}
    for label, payload in variants.items():
        response = upload(client, digits_case, payload)
        assert response.status_code == 201, (label, response.text)
        models[label] = response.json()
        # The stored file is the safetensors written from the loaded tensors: byte-identical to the
        # client's own safetensors export, so it is the same blob.
        assert models[label]["sha256"] == reference.json()["sha256"], label
    blob = stack.var_dir / "blobs" / "sha256" / reference.json()["sha256"][:2] / reference.json()["sha256"]
    assert blob.read_bytes() == digits_case.weights

    dataset = digits_case.upload_dataset(client).json()
    spec = {
        "dataset_id": dataset["id"],
        "group_by": ["digit"],
        "seed": 1,
        "diagnostics": {"curvature": "off"},
        "pruning": {"ratios": [0.5, 0.8], "methods": [{"method": "magnitude", "scope": "global"}]},
    }
    reports = []
    for model_id in (reference.json()["id"], models["state dict"]["id"]):
        created = client.post("/v1/audits", json=dict(spec, model_id=model_id))
        assert created.status_code == 202, created.text
        audit = wait_for_audit(client, created.json()["id"])
        assert audit["status"] == "succeeded", (audit, stack.log("worker"))
        reports.append(client.get(f"/v1/audits/{audit['id']}/report").json())
    assert reports[0]["runs"]
    first, second = comparable(reports[0]), comparable(reports[1])
    assert first == second, json.dumps(diff(first, second), indent=1)[:3000]


def test_checkpoints_that_are_not_state_dicts_are_422(stack, client, digits_case):
    tensors = digits_tensors(digits_case)
    before = stored(stack)
    cases = {
        "a list": (saved(list(tensors.values())), "not a state dict"),
        "non-tensor values": (
            saved(dict(tensors, **{"layers.0.weight": [1.0, 2.0]})),
            "'layers.0.weight' to a value of type list",
        ),
        "an int key": (saved({0: tensors["layers.0.weight"]}), "keys must be parameter names"),
        "an empty mapping": (saved({}), "empty"),
        "nested mappings": (saved({"encoder": tensors}), "'encoder' to a value of type dict"),
        "a sparse tensor": (saved(dict(tensors, **{"layers.0.bias": tensors["layers.0.bias"].to_sparse()})), "sparse"),
        "a complex tensor": (
            saved(dict(tensors, **{"layers.0.bias": tensors["layers.0.bias"].to(torch.complex64)})),
            "complex64",
        ),
        "a truncated checkpoint": (saved(tensors)[:-200], "truncated"),
        "a pickle that is not a checkpoint": (pickle.dumps({"a": 1}, protocol=2), "not a torch.save checkpoint"),
        "an unrelated zip": (zip_of({"hello.txt": b"hi"}), "not a PyTorch checkpoint"),
    }
    for label, (payload, fragment) in cases.items():
        body = assert_problem(upload(client, digits_case, payload), 422, EXPORT)
        assert fragment in body["detail"], (label, body["detail"])
    # A valid state dict for another architecture reaches the usual fit check, with its reasons.
    wrong = dict(tensors)
    wrong["layers.0.weight"] = torch.zeros(64, 30)
    assert_problem(upload(client, digits_case, saved(wrong)), 422, "layers.0.weight", "[64, 30]")
    assert stored(stack) == before


def zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# the byte cap, before the body is read
# --------------------------------------------------------------------------------------------------

CAP = 256 * 1024


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """An API whose upload cap is CAP bytes (the envelope allowance is 1 MiB on top)."""
    stack = start_stack(
        tmp_path_factory.mktemp("capped"), with_worker=False, settings={"PRUNEAUDIT_MAX_UPLOAD_BYTES": str(CAP)}
    )
    yield stack
    stack.stop()


def raw_request(url: str, head: str, body_chunks=(), timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send a request over a plain socket (headers as given, body chunks as given) and read the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            part = sock.recv(65536)
            if not part:
                break
            data += part
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(data) + 1


def test_declared_length_over_the_cap_is_413_before_the_body_is_sent(capped):
    before = stored(capped)
    started = time.monotonic()
    # Headers only: the body is never sent, so an answer proves the server did not wait to read it.
    status, headers, body = raw_request(
        capped.url,
        (
            "POST /v1/models HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {50 * 1024**3}\r\n\r\n"
        ),
    )
    assert time.monotonic() - started < 5
    assert status == 413 and headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == 413 and str(CAP) in problem["detail"] and problem["type"].endswith("/payload-too-large")
    assert stored(capped) == before


def test_chunked_body_over_the_cap_is_cut_off_while_streaming(capped, digits_case):
    before = stored(capped)
    chunk = b"0" * (64 * 1024)
    total = 0

    def body():
        nonlocal total
        head = (
            b'--x\r\nContent-Disposition: form-data; name="architecture"\r\n\r\n'
            + json.dumps(digits_case.architecture).encode()
            + b'\r\n--x\r\nContent-Disposition: form-data; name="weights"; filename="m.safetensors"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        yield b"%x\r\n%s\r\n" % (len(head), head)
        for _ in range(64):  # 4 MiB, well past cap + envelope; the server stops reading long before
            total += len(chunk)
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)
        yield b"0\r\n\r\n"

    status, headers, raw = raw_request(
        capped.url,
        (
            "POST /v1/models HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ),
        body(),
    )
    assert status == 413 and headers["content-type"] == "application/problem+json", raw
    assert json.loads(raw)["type"].endswith("/payload-too-large")
    assert stored(capped) == before


def test_file_over_the_cap_within_the_envelope_is_413_and_not_kept(capped, digits_case):
    before = stored(capped)
    with capped.client() as client:
        response = upload(client, digits_case, b"\0" * (CAP + 1), "model.safetensors")
        assert_problem(response, 413, str(CAP))
        assert stored(capped) == before
        # Under the cap, the same server takes the real model.
        assert digits_case.upload_model(client).status_code == 201


def compressed_checkpoint(n_floats: int) -> bytes:
    """A torch.save checkpoint whose tensor bytes are deflated: a few KB that expand to n_floats * 4."""
    skeleton = io.BytesIO()
    with torch.serialization.skip_data():  # writes the pickle and records, not the tensor bytes
        torch.save({"layers.0.weight": torch.empty(n_floats)}, skeleton)
    out = io.BytesIO()
    with zipfile.ZipFile(skeleton) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            if info.filename.endswith("/data/0"):
                target.writestr(zipfile.ZipInfo(info.filename), b"\0" * (n_floats * 4), zipfile.ZIP_DEFLATED)
            else:
                target.writestr(info, source.read(info))
    return out.getvalue()


def test_checkpoint_that_expands_past_the_cap_is_413_and_not_kept(capped, digits_case):
    bomb = compressed_checkpoint(1024 * 1024)  # 4 MiB of tensor data
    assert len(bomb) < CAP // 4
    before = stored(capped)
    with capped.client() as client:
        assert_problem(upload(client, digits_case, bomb), 413, "converted from the checkpoint", str(CAP))
    assert stored(capped) == before
