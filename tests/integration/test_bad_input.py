"""Bad input gets a clear RFC 9457 problem (4xx) with a reason a person can act on, and nothing is kept."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from tests.integration.stack import assert_problem, start_stack


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("api-only"), with_worker=False)
    with stack.client() as client:
        yield stack, client
    stack.stop()


def stored_blobs(stack) -> list:
    return (
        sorted(p.name for p in (stack.var_dir / "blobs" / "sha256").rglob("*") if p.is_file())
        if (stack.var_dir / "blobs" / "sha256").exists()
        else []
    )


def test_non_weights_upload_is_refused_and_not_kept(api, digits_case):
    stack, client = api
    before = stored_blobs(stack)
    assert_problem(digits_case.upload_model(client, weights=pickle.dumps({"a": 1})), 422, "safetensors")
    assert_problem(digits_case.upload_model(client, weights=b"not a model at all"), 422, "safetensors")
    assert stored_blobs(stack) == before
    assert not list((stack.var_dir / "blobs" / "tmp").iterdir())


def test_unknown_architecture(api, digits_case):
    _stack, client = api
    body = assert_problem(digits_case.upload_model(client, architecture={"name": "transformer"}), 422, "mlp", "cnn")
    assert body["errors"]
    assert_problem(
        client.post(
            "/v1/models", files={"weights": ("m.safetensors", digits_case.weights)}, data={"architecture": "{not json"}
        ),
        422,
    )


def test_weights_that_do_not_fit_the_architecture(api, digits_case):
    _stack, client = api
    wrong = dict(digits_case.architecture, in_features=30)
    assert_problem(digits_case.upload_model(client, architecture=wrong), 422, "layers.0.weight", "[64, 30]")
    huge = dict(digits_case.architecture, hidden=[65536] * 16)
    assert_problem(digits_case.upload_model(client, architecture=huge), 422, "at most")
    deeper = dict(digits_case.architecture, hidden=[64, 32, 16])
    assert_problem(digits_case.upload_model(client, architecture=deeper), 422, "layers.6.weight")


def test_dataset_without_labels(api, digits_case):
    _stack, client = api
    buffer = io.BytesIO()
    np.savez(buffer, x=digits_case.x, group_digit=digits_case.y)
    assert_problem(digits_case.upload_dataset(client, buffer.getvalue()), 422, "y")
    csv = "f1,f2,sex\n1.0,2.0,F\n"
    assert_problem(digits_case.upload_dataset(client, csv.encode(), filename="d.csv", groups="sex"), 422, "label")


def test_model_dataset_shape_mismatch_at_audit_creation(api, digits_case):
    _stack, client = api
    model = digits_case.upload_model(client).json()
    narrow = digits_case.upload_dataset(client, digits_case.npz(x=digits_case.x[:, :30])).json()
    response = client.post(
        "/v1/audits", json={"model_id": model["id"], "dataset_id": narrow["id"], "group_by": ["digit"]}
    )
    assert_problem(response, 422, "model expects input [64]", "[30]")


def test_spec_errors(api, digits_case):
    _stack, client = api
    model = digits_case.upload_model(client).json()
    dataset = digits_case.upload_dataset(client).json()
    base = {"model_id": model["id"], "dataset_id": dataset["id"], "group_by": ["digit"]}
    audits_before = client.get("/v1/audits").json()["total"]
    assert_problem(client.post("/v1/audits", json=dict(base, group_by=["race"])), 422, "race", "digit")
    assert_problem(client.post("/v1/audits", json=dict(base, pruning={"ratios": [1.5]})), 422, "between 0 and 1")
    assert_problem(client.post("/v1/audits", json=dict(base, pruning={"ratios": []})), 422)
    assert_problem(client.post("/v1/audits", json=dict(base, pruning={"methods": [{"method": "pca"}]})), 422, "method")
    finetuned = {"methods": [{"method": "magnitude", "fine_tuning": {"epochs": 1}}]}
    assert_problem(client.post("/v1/audits", json=dict(base, pruning=finetuned)), 422, "train dataset")
    gradual = {"methods": [{"method": "channel", "schedule": "gradual", "fine_tuning": {}}]}
    assert_problem(client.post("/v1/audits", json=dict(base, pruning=gradual)), 422, "magnitude")
    assert_problem(client.post("/v1/audits", json=dict(base, colour="red")), 422, "colour")
    assert_problem(client.post("/v1/audits", json=dict(base, model_id="nope")), 422, "model_id", "pattern")
    assert_problem(client.post("/v1/audits", json=dict(base, model_id="0" * 32)), 422, "does not exist")
    assert_problem(
        client.post("/v1/audits", json=dict(base, pruning={"methods": [{"ignored_layers": ["layers.9"]}]})),
        422,
        "layers.9",
    )
    assert_problem(
        client.post("/v1/audits", json=dict(base, pruning={"ratios": [i / 100 for i in range(1, 80)]})), 422, "at most"
    )
    assert_problem(client.post("/v1/audits", content=b"{", headers={"content-type": "application/json"}), 422)
    assert client.get("/v1/audits").json()["total"] == audits_before


def test_report_is_409_until_the_audit_succeeds(api, digits_case):
    _stack, client = api
    model = digits_case.upload_model(client).json()
    dataset = digits_case.upload_dataset(client).json()
    audit = client.post(
        "/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"], "group_by": ["digit"]}
    ).json()
    # No worker runs in this stack, so the audit stays queued.
    assert client.get(f"/v1/audits/{audit['id']}").json()["status"] == "queued"
    assert_problem(client.get(f"/v1/audits/{audit['id']}/report"), 409, "queued")


def test_unknown_ids_are_404(api):
    _stack, client = api
    assert_problem(client.get("/v1/audits/missing"), 404, "audit missing does not exist")
    assert_problem(client.get("/v1/models/missing"), 404)
    assert_problem(client.get("/v1/datasets/missing"), 404)
    assert_problem(client.get("/v1/nothing-here"), 404)


def test_openapi_documents_the_api(api):
    _stack, client = api
    document = client.get("/openapi.json").json()
    for path in ("/v1/models", "/v1/datasets", "/v1/audits", "/v1/audits/{audit_id}/report", "/v1/architectures"):
        assert path in document["paths"]
    assert "AuditReport" in document["components"]["schemas"]
    assert client.get("/docs").status_code == 200
    names = [a["name"] for a in client.get("/v1/architectures").json()]
    assert names == [
        "mlp",
        "cnn",
        "resnet18",
        "resnet34",
        "resnet50",
        "vgg16_bn",
        "mobilenet_v2",
        "resnet20",
        "resnet56",
        "pruned",
        "onnx",
    ]


def test_cancel_a_queued_audit(api, digits_case):
    _stack, client = api
    model = digits_case.upload_model(client).json()
    dataset = digits_case.upload_dataset(client).json()
    audit = client.post(
        "/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"], "group_by": ["digit"]}
    ).json()
    cancelled = client.post(f"/v1/audits/{audit['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.get(f"/v1/audits/{audit['id']}").json()["status"] == "cancelled"
    assert_problem(client.post(f"/v1/audits/{audit['id']}/cancel"), 409, "already ended")
    assert_problem(client.get(f"/v1/audits/{audit['id']}/report"), 409, "cancelled")
    assert_problem(client.post("/v1/audits/missing/cancel"), 404)


def test_idempotency_key_makes_retries_safe(api, digits_case):
    from concurrent.futures import ThreadPoolExecutor

    stack, client = api
    model = digits_case.upload_model(client).json()
    dataset = digits_case.upload_dataset(client).json()
    body = {"model_id": model["id"], "dataset_id": dataset["id"], "group_by": ["digit"]}
    before = client.get("/v1/audits").json()["total"]
    first = client.post("/v1/audits", json=body, headers={"Idempotency-Key": "nightly-2026-11-24"})
    replay = client.post("/v1/audits", json=body, headers={"Idempotency-Key": "nightly-2026-11-24"})
    assert first.status_code == replay.status_code == 202
    assert replay.json()["id"] == first.json()["id"] and replay.headers["location"] == first.headers["location"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert_problem(
        client.post("/v1/audits", json=dict(body, seed=7), headers={"Idempotency-Key": "nightly-2026-11-24"}),
        422,
        "different request body",
    )
    assert client.get("/v1/audits").json()["total"] == before + 1

    def post(_):
        with stack.client() as own:
            return own.post("/v1/audits", json=body, headers={"Idempotency-Key": "concurrent"})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    assert {r.status_code for r in responses} <= {202, 409}
    assert len({r.json()["id"] for r in responses if r.status_code == 202}) == 1
    assert client.get("/v1/audits").json()["total"] == before + 2
