"""HTTP → broker → a real Celery worker process → database → report, on the embedded defaults (SQLite
database and SQLite broker) and on real Redis + PostgreSQL. Report numbers are checked against a
brute-force numpy reference, not against the engine."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.reference import group_gradients, per_group, prune_reference
from tests.integration.stack import start_stack, wait_for_audit


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("embedded"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def services_stack(tmp_path_factory, postgres_url, redis_broker):
    broker_url, prefix = redis_broker
    stack = start_stack(tmp_path_factory.mktemp("services"), database_url=postgres_url, broker_url=broker_url,
                        key_prefix=prefix)
    yield stack
    stack.stop()


def run_and_check_audit(stack, digits_case, scope: str, ratios: list[float]) -> dict:
    with stack.client() as client:
        model = digits_case.upload_model(client)
        assert model.status_code == 201, model.text
        model = model.json()
        assert model["parameter_count"] == sum(v.size for v in digits_case.state.values())
        assert model["input_shape"] == [64] and model["num_classes"] == 10
        dataset = digits_case.upload_dataset(client)
        assert dataset.status_code == 201, dataset.text
        dataset = dataset.json()
        assert dataset["rows"] == len(digits_case.y)
        assert sum(dataset["groups"]["digit"]["sizes"]) == len(digits_case.y)

        created = client.post("/v1/audits", json={
            "model_id": model["id"], "dataset_id": dataset["id"], "group_by": ["digit"],
            "pruning": {"method": "magnitude", "scope": scope, "ratios": ratios}, "seed": 3,
        })
        assert created.status_code == 202, created.text
        assert created.headers["location"].endswith(f"/v1/audits/{created.json()['id']}")
        audit = wait_for_audit(client, created.json()["id"])
        assert audit["status"] == "succeeded", (audit, stack.log("worker"))
        assert audit["progress"] == 1.0
        report = client.get(f"/v1/audits/{audit['id']}/report")
        assert report.status_code == 200
        report = report.json()

    assert [run["ratio"] for run in report["runs"]] == sorted(ratios)
    dense_reference = per_group(digits_case.state, digits_case.x, digits_case.y, digits_case.y)
    dense_gradients = group_gradients(digits_case.state, digits_case.x, digits_case.y, digits_case.y)
    for run in report["runs"]:
        pruned_state = prune_reference(digits_case.state, run["ratio"], scope)
        reference = per_group(pruned_state, digits_case.x, digits_case.y, digits_case.y)
        weights = [k for k, v in digits_case.state.items() if k.endswith(".weight")]
        zeros = sum(int((pruned_state[k] == 0).sum()) for k in weights)
        assert run["achieved_sparsity"] == pytest.approx(zeros / sum(pruned_state[k].size for k in weights))
        overall_drop = dense_reference["overall"][0] - reference["overall"][0]
        assert run["overall"]["accuracy"] == pytest.approx(reference["overall"][0], abs=1e-12)
        assert run["overall"]["accuracy_drop"] == pytest.approx(overall_drop, abs=1e-12)
        (digit,) = run["attributes"]
        assert {g["group"] for g in digit["groups"]} == {str(d) for d in range(10)}
        excessive = []
        for group in digit["groups"]:
            accuracy, loss = reference[group["group"]]
            dense_accuracy, dense_loss = dense_reference[group["group"]]
            assert group["accuracy"] == pytest.approx(accuracy, abs=1e-12)
            assert group["loss"] == pytest.approx(loss, rel=1e-4)
            assert group["accuracy_drop"] == pytest.approx(dense_accuracy - accuracy, abs=1e-12)
            assert group["excess_accuracy_gap"] == pytest.approx(dense_accuracy - accuracy - overall_drop, abs=1e-12)
            assert group["excessive_loss"] == pytest.approx(loss - dense_loss, rel=1e-3, abs=1e-5)
            excessive.append(loss - dense_loss)
        # Diagnostics on by default: exact gradient norms (dense and pruned, unmasked entries only) and
        # g_a·δ against autograd on each whole group; curvature present with its subsample size.
        kept = {k: (v != 0).astype(np.float64) for k, v in pruned_state.items() if k in weights}
        pruned_gradients = group_gradients(pruned_state, digits_case.x, digits_case.y, digits_case.y, kept)
        delta = np.concatenate([(pruned_state[k] - digits_case.state[k]).reshape(-1) for k in digits_case.state])
        assert run["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)
        for group in digit["groups"]:
            diagnostics = group["diagnostics"]
            dense_gradient = dense_gradients[group["group"]]
            assert diagnostics["dense_gradient_norm"] == pytest.approx(np.linalg.norm(dense_gradient), rel=1e-4)
            assert diagnostics["gradient_norm"] == pytest.approx(
                np.linalg.norm(pruned_gradients[group["group"]]), rel=1e-4)
            assert diagnostics["gradient_dot_delta"] == pytest.approx(dense_gradient @ delta, rel=1e-3, abs=1e-6)
            assert diagnostics["hessian_trace"] is not None and diagnostics["curvature_examples"] == group["n"]
            assert diagnostics["predicted_excessive_loss"] == pytest.approx(
                diagnostics["gradient_dot_delta"] + 0.5 * diagnostics["delta_hessian_delta"])
            low, high = group["confidence_intervals"]["accuracy_ci"]
            assert low <= group["accuracy"] <= high
        assert set(digit["diagnostics"]) == {"size_vs_dense_gradient_norm", "dense_gradient_norm_vs_dense_hessian_trace",
                                             "dense_accuracy_vs_accuracy_drop", "predicted_vs_excessive_loss"}
        aggregates = digit["aggregates"]
        assert aggregates["loss_fairness_violation"] == pytest.approx(max(excessive) - min(excessive), rel=1e-3, abs=1e-5)
        assert aggregates["max_excess_accuracy_gap"] == pytest.approx(max(g["excess_accuracy_gap"] for g in digit["groups"]))
    return report


def test_embedded_global_sweep_matches_brute_force(embedded_stack, digits_case):
    report = run_and_check_audit(embedded_stack, digits_case, "global", [0.5, 0.8, 0.95])
    assert report["dense"]["method"] == "dense"
    assert report["dense"]["overall"]["accuracy"] > 0.9
    # At 95% sparsity a digits MLP loses accuracy, and unevenly across classes.
    assert report["runs"][-1]["overall"]["accuracy_drop"] > 0
    assert report["runs"][-1]["attributes"][0]["aggregates"]["max_excess_accuracy_gap"] > 0


def test_embedded_layerwise_sweep_matches_brute_force(embedded_stack, digits_case):
    report = run_and_check_audit(embedded_stack, digits_case, "layerwise", [0.3, 0.9])
    for run in report["runs"]:
        for layer in run["layer_sparsity"].values():
            assert abs(layer["zeros"] - round(run["ratio"] * layer["numel"])) == 0


def test_audits_are_listed_newest_first(embedded_stack):
    with embedded_stack.client() as client:
        page = client.get("/v1/audits", params={"limit": 1}).json()
        everything = client.get("/v1/audits").json()
    assert page["total"] == everything["total"] >= 2
    assert len(page["items"]) == 1 and page["items"][0]["id"] == everything["items"][0]["id"]
    created = [item["created_at"] for item in everything["items"]]
    assert created == sorted(created, reverse=True)


def test_worker_failure_is_reported_with_reason(embedded_stack, digits_case):
    """Weights that stop fitting after upload (here: the blob is overwritten on disk) fail the audit in the
    worker with a reason a person can act on; the audit never stays running."""
    from safetensors.numpy import save

    with embedded_stack.client() as client:
        model = digits_case.upload_model(client).json()
        dataset = digits_case.upload_dataset(client).json()
        blob = embedded_stack.var_dir / "blobs" / "sha256" / model["sha256"][:2] / model["sha256"]
        wrong = {k: (v[:, :30] if k == "layers.0.weight" else v) for k, v in digits_case.state.items()}
        blob.write_bytes(save(wrong))
        created = client.post("/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"],
                                                  "group_by": ["digit"]}).json()
        audit = wait_for_audit(client, created["id"])
        assert audit["status"] == "failed"
        assert "layers.0.weight" in audit["error"]
        report = client.get(f"/v1/audits/{audit['id']}/report")
        assert report.status_code == 409
        assert report.headers["content-type"] == "application/problem+json"
        assert "failed" in report.json()["detail"]
    # The blob is shared by content address; restore it for other tests.
    blob.write_bytes(digits_case.weights)


@pytest.mark.services
def test_redis_postgres_sweep_matches_brute_force(services_stack, digits_case, redis_broker):
    import redis

    run_and_check_audit(services_stack, digits_case, "global", [0.6, 0.9])
    url, prefix = redis_broker
    queue = services_stack.env["PRUNEAUDIT_QUEUE_NAME"]
    # Our broker keys live under our prefix only, so a shared Redis keeps tenants apart.
    names = [key.decode() for key in redis.Redis.from_url(url).scan_iter(match=f"*{queue}*")]
    assert names and all(name.startswith(prefix) for name in names), names


@pytest.mark.services
def test_postgres_schema_matches_the_orm(services_stack, postgres_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from service.models import Base

    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_csv_dataset_with_string_groups_through_the_worker(embedded_stack, digits_case):
    """A CSV upload (column roles in the form, string group values, a missing value) audits end to end."""
    header = [f"pixel{i}" for i in range(64)] + ["digit", "parity", "source"]
    lines = [",".join(header)]
    for index, (row, label) in enumerate(zip(digits_case.x, digits_case.y)):
        parity = "" if index == 0 else ("even" if label % 2 == 0 else "odd")
        lines.append(",".join([*(f"{v:.6g}" for v in row), str(label), parity, "scan"]))
    content = ("\n".join(lines) + "\n").encode()
    with embedded_stack.client() as client:
        model = digits_case.upload_model(client).json()
        dataset = digits_case.upload_dataset(client, content, filename="digits.csv", label="digit",
                                             groups="parity,source")
        assert dataset.status_code == 201, dataset.text
        dataset = dataset.json()
        assert dataset["feature_shape"] == [64]
        assert dataset["groups"]["parity"]["names"] == ["even", "odd"]
        assert dataset["groups"]["parity"]["missing"] == 1
        created = client.post("/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"],
                                                  "group_by": ["parity", "source"], "pruning": {"ratios": [0.8]}}).json()
        audit = wait_for_audit(client, created["id"])
        assert audit["status"] == "succeeded", audit
        (run,) = client.get(f"/v1/audits/{audit['id']}/report").json()["runs"]
    parity, source, both = run["attributes"]
    assert [parity["attribute"], source["attribute"], both["attribute"]] == ["parity", "source", "parity&source"]
    assert [g["group"] for g in both["groups"]] == ["even&scan", "odd&scan"]
    assert both["n_missing"] == 1 and source["n_missing"] == 0
    assert parity["n_missing"] == 1
    sizes = {g["group"]: g["n"] for g in parity["groups"]}
    expected_even = int((digits_case.y[1:] % 2 == 0).sum())
    assert sizes == {"even": expected_even, "odd": len(digits_case.y) - 1 - expected_even}
