"""ONNX uploads through the real stack (API process → SQLite broker → Celery worker process): a model exported
by torch's own exporter uploads with architecture={"name": "onnx"}, audits like a registry model, and its pruned
runs download as ONNX that onnxruntime runs. References are independent of the engine: the same audit of the
registry `mlp` with the same weights (identical reports), onnxruntime's predictions on the dataset (per-group
accuracy of the dense model and of the downloaded pruned graphs). Hostile files are refused with a 4xx and
nothing stored, and no code in them runs."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import time
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load

from tests.integration.reference import mlp_logits
from tests.integration.stack import assert_problem, start_stack, wait_for_audit
from tests.integration.test_upload_safety import TouchOnLoad, stored
from tests.onnx_models import export, exported, seeded_model
from worker.engine.onnx_reference import reference_logits

ONNX = json.dumps({"name": "onnx"})
# What the reports of the registry MLP and of its ONNX export may differ in: timings, ids, links, the host, and
# the architecture each names (everything measured must be equal).
VOLATILE = {
    *("seconds", "id", "weights_url", "worker", "architecture", "latency", "environment", "created_at"),
    *("latency_s_batch_1", "latency_s_batch_64"),  # channel-pruned runs' measured CPU latencies
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("onnx"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack):
    with stack.client() as client:
        yield client


def upload_onnx(client, content: bytes, filename: str = "model.onnx"):
    return client.post("/v1/models", files={"weights": (filename, content)}, data={"architecture": ONNX})


def images(digits_case, x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), 1, 8, 8).astype(np.float32)


def run_audit(client, stack, body: dict, timeout_s: float = 300) -> tuple[dict, float]:
    started = time.monotonic()
    created = client.post("/v1/audits", json=body)
    assert created.status_code == 202, created.text
    audit = wait_for_audit(client, created.json()["id"], timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    assert audit["status"] == "succeeded", (audit.get("error"), stack.log("worker")[-3000:])
    return client.get(f"/v1/audits/{audit['id']}/report").json(), elapsed


def group_accuracy(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    correct = logits.argmax(1) == y
    return {str(g): float(correct[y == g].mean()) for g in np.unique(y)}


def assert_same(ours, theirs, path: str = "report") -> None:
    """Equal structure and values (floats within 1e-6 relative), the VOLATILE keys aside."""
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), path
        for key in ours:
            if key not in VOLATILE:
                assert_same(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), path
        for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{path}[{index}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9), path
    else:
        assert ours == theirs, path


def registry_mlp_onnx(digits_case, opset: int) -> bytes:
    from worker.engine.architectures import build_model

    model = build_model(digits_case.architecture)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in digits_case.state.items()})
    return export(model, (64,), opset)


@pytest.mark.slow
def test_mlp_export_audits_exactly_like_the_registry_mlp(stack, client, digits_case):
    graph = registry_mlp_onnx(digits_case, 17)
    imported = upload_onnx(client, graph)
    assert imported.status_code == 201, imported.text
    model = imported.json()
    assert model["architecture"]["name"] == "onnx" and model["input_shape"] == [64] and model["num_classes"] == 10
    assert model["parameter_count"] == sum(v.size for v in digits_case.state.values())
    registry = digits_case.upload_model(client).json()
    dataset = digits_case.upload_dataset(client).json()["id"]
    train = digits_case.upload_train_dataset(client).json()["id"]
    body = {
        "dataset_id": dataset,
        "train_dataset_id": train,
        "group_by": ["digit"],
        "pruning": {
            "ratios": [0.7],
            "methods": [
                {"method": "magnitude", "scope": "global"},
                {"method": "magnitude", "schedule": "gradual", "pruning_steps": 2, "fine_tuning": {"epochs": 1}},
                {"method": "channel"},
            ],
        },
        "mitigations": ["finetune"],
        "diagnostics": {"pruned_models": True},
        "statistics": {"bootstrap_resamples": 50},
        "seed": 5,
    }
    ours, _ = run_audit(client, stack, {**body, "model_id": model["id"]})
    theirs, _ = run_audit(client, stack, {**body, "model_id": registry["id"]})
    assert_same(ours["dense"], theirs["dense"], "dense")
    assert_same(ours["runs"], theirs["runs"], "runs")
    assert_same(ours["verdict"], theirs["verdict"], "verdict")
    channel = [run for run in ours["runs"] if run["method"] == "channel"]
    assert len(channel) == 2 and channel[0]["compression"]["ratios"]["parameters"] > 1.2
    # A channel-pruned run's architecture is the graph it wrote (a mitigation placed 'after' it started from it).
    pruned_graph = client.get(channel[0]["weights_url"] + ".onnx").content
    assert channel[0]["recipe"]["architecture"]["graph_sha256"] == hashlib.sha256(pruned_graph).hexdigest()
    # Every run downloads as ONNX: onnxruntime on it gives the numpy logits of the registry run's weights.
    for mine, registry_run in zip(ours["runs"], theirs["runs"], strict=True):
        pruned_graph = client.get(mine["weights_url"] + ".onnx")
        assert pruned_graph.status_code == 200, pruned_graph.text
        expected = mlp_logits(load(client.get(registry_run["weights_url"]).content), digits_case.x)
        np.testing.assert_allclose(reference_logits(pruned_graph.content, digits_case.x), expected, atol=1e-4)
    assert client.get(theirs["runs"][0]["weights_url"] + ".onnx").status_code == 404  # a registry model has none


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "opset"), [("vit_style", 21), ("resnet_style", 17), ("mobilenet_style", 21), ("tabular_gelu", 17)]
)
def test_exported_models_audit_with_onnxruntime_numbers(stack, client, digits_case, name, opset):
    graph = exported(name, opset)
    imported = upload_onnx(client, graph)
    assert imported.status_code == 201, imported.text
    model = imported.json()
    x = digits_case.x.astype(np.float32) if name == "tabular_gelu" else images(digits_case, digits_case.x)
    dataset = digits_case.upload_dataset(client, digits_case.npz(x=x)).json()["id"]
    body = {
        "model_id": model["id"],
        "dataset_id": dataset,
        "group_by": ["digit"],
        "pruning": {"ratios": [0.5], "methods": [{"method": "magnitude", "scope": "global"}]},
        "statistics": {"bootstrap_resamples": 0},
        # Curvature (Hessian, Gauss–Newton, R̂) on the transformer and the ResNet; the others skip it for time.
        "diagnostics": {"curvature": "on" if name in ("vit_style", "resnet_style") else "off"},
    }
    if name in ("resnet_style", "mobilenet_style"):  # CNNs also lose channels
        body["pruning"]["methods"].append({"method": "channel", "norm": "l2"})
    if name == "vit_style":  # the transformer also under random layer-wise pruning and a mitigation
        x_train = images(digits_case, digits_case.x_train)
        train = digits_case.upload_dataset(
            client, digits_case.npz(x=x_train, y=digits_case.y_train, group_digit=digits_case.y_train)
        )
        body["pruning"]["methods"].append({"method": "random", "scope": "layerwise"})
        body |= {"train_dataset_id": train.json()["id"], "mitigations": [{"name": "equalized_loss", "epochs": 1}]}
    report, elapsed = run_audit(client, stack, body)
    print(f"{name}@{opset}: audit {elapsed:.1f} s, reference at upload {model['architecture']['reference']}")
    dense = {g["group"]: g["accuracy"] for g in report["dense"]["attributes"][0]["groups"]}
    assert dense == pytest.approx(group_accuracy(reference_logits(graph, x), digits_case.y), abs=1e-12)
    assert len(report["runs"]) == (4 if name == "vit_style" else 1 if name == "tabular_gelu" else 2)
    for run in report["runs"]:  # each run's numbers are those of its downloaded pruned graph in onnxruntime
        pruned = client.get(run["weights_url"] + ".onnx").content
        onnx.checker.check_model(onnx.load_model_from_string(pruned), full_check=True)
        accuracy = {g["group"]: g["accuracy"] for g in run["attributes"][0]["groups"]}
        assert accuracy == pytest.approx(group_accuracy(reference_logits(pruned, x), digits_case.y), abs=1e-12)
        if run["method"] == "channel":  # physically smaller: fewer parameters and multiply-accumulates
            assert run["compression"]["ratios"]["parameters"] > 1.1 and run["compression"]["ratios"]["macs"] > 1.1
        else:
            assert run["achieved_sparsity"] == pytest.approx(0.5, abs=0.01), run["label"]
    diagnostics = report["dense"]["attributes"][0]["groups"][0]["diagnostics"]
    assert diagnostics["dense_gradient_norm"] is not None
    if name in ("vit_style", "resnet_style"):
        assert diagnostics["hessian_trace"] is not None
    if name == "vit_style":
        assert elapsed < 240


def test_channel_pruning_that_cannot_follow_the_graph_fails_its_run_with_the_reason(stack, client, digits_case):
    model = upload_onnx(client, exported("vit_style", 21)).json()
    dataset = digits_case.upload_dataset(client, digits_case.npz(x=images(digits_case, digits_case.x))).json()["id"]
    created = client.post(
        "/v1/audits",
        json={
            "model_id": model["id"],
            "dataset_id": dataset,
            "group_by": ["digit"],
            "pruning": {"ratios": [0.5], "methods": [{"method": "channel"}]},
            "statistics": {"bootstrap_resamples": 0},
            "diagnostics": {"curvature": "off"},
        },
    )
    assert created.status_code == 202, created.text  # attempted, not refused at submission
    audit = wait_for_audit(client, created.json()["id"], timeout_s=120)
    assert audit["status"] == "failed"
    assert "channel pruning cannot remove channels from this imported graph" in audit["error"]
    assert "use magnitude or random pruning" in audit["error"]


# ---------------------------------------------------------------------------------------------- hostile files


def graph_with(*nodes, initializers=(), opsets=(("", 21),), inputs=None) -> bytes:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])]
    graph = helper.make_graph(
        list(nodes),
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    return model.SerializeToString()


def declared_tensor(name: str, dims: list[int]) -> TensorProto:
    """A float tensor that declares `dims` and holds no data."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT)
    tensor.dims.extend(dims)
    return tensor


def external_weight(location: str) -> TensorProto:
    tensor = declared_tensor("w", [4, 3])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def hostile_files(marker) -> dict[str, tuple[bytes, str]]:
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    huge = declared_tensor("w", [1_000_000, 1_000_000])
    cyclic = [
        helper.make_node("Relu", ["b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
        helper.make_node("MatMul", ["b", "w"], ["y"], name="out"),
    ]
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    branch = helper.make_graph([], "branch", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)])
    condition = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="if")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/data.pkl", pickle.dumps({"w": 1}))
    complete = exported("tabular_gelu", 21)
    return {
        "external data at ../../etc/passwd": (
            graph_with(matmul, initializers=[external_weight("../../etc/passwd")]),
            "external data at '../../etc/passwd'",
        ),
        "10^12 elements declared": (graph_with(matmul, initializers=[huge]), "1000000000000 elements"),
        "custom domain": (
            graph_with(
                helper.make_node("Run", ["x"], ["y"], domain="com.evil", name="n"), opsets=(("", 21), ("com.evil", 1))
            ),
            "custom domain 'com.evil'",
        ),
        "unknown op": (graph_with(helper.make_node("Hardmax", ["x"], ["y"], name="h")), "the op Hardmax"),
        "If subgraph": (graph_with(condition), "the op If"),
        "cycle": (graph_with(*cyclic, initializers=[weight]), "onnx.checker refused"),
        "truncated protobuf": (complete[: len(complete) // 2], "not a valid ONNX protobuf"),
        "zip renamed .onnx": (buffer.getvalue(), "zip archive"),
        "pickle renamed .onnx": (pickle.dumps(TouchOnLoad(marker), protocol=2), "pickle"),
    }


def test_hostile_files_are_refused_and_nothing_is_stored(stack, client, tmp_path):
    marker = tmp_path / "MARKER"
    before = stored(stack)
    for label, (content, reason) in hostile_files(marker).items():
        body = assert_problem(upload_onnx(client, content), 422, reason)
        assert "ONNX" in body["detail"], (label, body)
        assert stored(stack) == before, label
    assert not marker.exists(), "a pickle renamed .onnx was unpickled"


def test_external_data_refusal_says_how_to_export_one_file(client):
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    body = assert_problem(
        upload_onnx(client, graph_with(matmul, initializers=[external_weight("model.onnx.data")])), 422
    )
    assert "external_data=False" in body["detail"] and "save_as_external_data=False" in body["detail"]


def test_a_2_gb_content_length_is_refused_before_the_body_is_read(stack):
    import socket
    from urllib.parse import urlparse

    url = urlparse(stack.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            (
                "POST /v1/models HTTP/1.1\r\nHost: x\r\nX-API-Key: " + stack.api_key + "\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 2147483648\r\n\r\n"
            ).encode()
        )
        answer = sock.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer


def test_dynamic_non_batch_dimension_is_refused_with_the_reason(client):
    relu = helper.make_node("Relu", ["x"], ["y"], name="act")
    dynamic = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "features"])]
    assert_problem(upload_onnx(client, graph_with(relu, inputs=dynamic)), 422, "input dimension 1 is dynamic")


def test_an_audit_whose_model_no_longer_matches_onnxruntime_is_refused_with_both_numbers(stack, client, digits_case):
    """The audit-start check: weights that drifted from the stored graph (here, rewritten on disk) stop the audit."""
    from safetensors.numpy import save_file

    from service.storage import BlobStore

    model = upload_onnx(client, export(seeded_model("tabular_gelu", seed=7), (64,), 21)).json()  # its own blob
    path = BlobStore(stack.var_dir / "blobs").blob_path(model["sha256"])
    weights = load(path.read_bytes())
    weights["out.bias"] = weights["out.bias"] + 1.0  # every logit moves; the argmax may not
    save_file(weights, str(path))
    created = client.post(
        "/v1/audits",
        json={
            "model_id": model["id"],
            "dataset_id": digits_case.upload_dataset(client).json()["id"],
            "group_by": ["digit"],
            "pruning": {"ratios": [0.5], "methods": [{"method": "magnitude"}]},
        },
    )
    assert created.status_code == 202, created.text
    audit = wait_for_audit(client, created.json()["id"])
    assert audit["status"] == "failed"
    assert "does not match onnxruntime" in audit["error"] and "max |logit difference|" in audit["error"], audit
