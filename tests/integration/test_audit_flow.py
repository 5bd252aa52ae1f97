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
    stack = start_stack(
        tmp_path_factory.mktemp("services"), database_url=postgres_url, broker_url=broker_url, key_prefix=prefix
    )
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

        created = client.post(
            "/v1/audits",
            json={
                "model_id": model["id"],
                "dataset_id": dataset["id"],
                "group_by": ["digit"],
                "pruning": {
                    "ratios": ratios,
                    "methods": [{"method": "magnitude", "scope": scope, "ignored_layers": []}],
                },
                # Every group whole (≤ 183 examples): R̂'s terms are exact, and so comparable with autograd.
                "diagnostics": {
                    "pruned_models": True,
                    "max_examples_per_group": 256,
                    "sampled_examples_per_group": 256,
                },
                "seed": 3,
            },
        )
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
        # Exact gradient norms (dense, and pruned on request: unmasked entries only) and g_a·δ against autograd
        # on each whole group; curvature and the Gauss–Newton trace present with their subsample sizes.
        kept = {k: (v != 0).astype(np.float64) for k, v in pruned_state.items() if k in weights}
        pruned_gradients = group_gradients(pruned_state, digits_case.x, digits_case.y, digits_case.y, kept)
        delta = np.concatenate([(pruned_state[k] - digits_case.state[k]).reshape(-1) for k in digits_case.state])
        assert run["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)
        for group in digit["groups"]:
            diagnostics = group["diagnostics"]
            dense_gradient = dense_gradients[group["group"]]
            assert diagnostics["dense_gradient_norm"] == pytest.approx(np.linalg.norm(dense_gradient), rel=1e-4)
            assert diagnostics["gradient_norm"] == pytest.approx(
                np.linalg.norm(pruned_gradients[group["group"]]), rel=1e-4
            )
            assert diagnostics["gradient_dot_delta"] == pytest.approx(dense_gradient @ delta, rel=1e-3, abs=1e-6)
            assert diagnostics["hessian_trace"] is not None and diagnostics["curvature_examples"] == group["n"]
            assert diagnostics["dense_gauss_newton_trace"] > 0 and diagnostics["sampled_examples"] == group["n"]
            assert diagnostics["gradient_dot_delta_se"] == diagnostics["delta_hessian_delta_se"] == 0.0
            assert diagnostics["predicted_excessive_loss"] == pytest.approx(
                diagnostics["gradient_dot_delta"] + 0.5 * diagnostics["delta_hessian_delta"]
            )
            low, high = group["confidence_intervals"]["accuracy_ci"]
            assert low <= group["accuracy"] <= high
        assert set(digit["diagnostics"]) == {
            "size_vs_dense_gradient_norm",
            "dense_gradient_norm_vs_dense_hessian_trace",
            "dense_accuracy_vs_accuracy_drop",
            "predicted_vs_excessive_loss",
        }
        aggregates = digit["aggregates"]
        assert aggregates["loss_fairness_violation"] == pytest.approx(
            max(excessive) - min(excessive), rel=1e-3, abs=1e-5
        )
        assert aggregates["max_excess_accuracy_gap"] == pytest.approx(
            max(g["excess_accuracy_gap"] for g in digit["groups"])
        )
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
        created = client.post(
            "/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"], "group_by": ["digit"]}
        ).json()
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
    for index, (row, label) in enumerate(zip(digits_case.x, digits_case.y, strict=True)):
        parity = "" if index == 0 else ("even" if label % 2 == 0 else "odd")
        lines.append(",".join([*(f"{v:.6g}" for v in row), str(label), parity, "scan"]))
    content = ("\n".join(lines) + "\n").encode()
    with embedded_stack.client() as client:
        model = digits_case.upload_model(client).json()
        dataset = digits_case.upload_dataset(
            client, content, filename="digits.csv", label="digit", groups="parity,source"
        )
        assert dataset.status_code == 201, dataset.text
        dataset = dataset.json()
        assert dataset["feature_shape"] == [64]
        assert dataset["groups"]["parity"]["names"] == ["even", "odd"]
        assert dataset["groups"]["parity"]["missing"] == 1
        created = client.post(
            "/v1/audits",
            json={
                "model_id": model["id"],
                "dataset_id": dataset["id"],
                "group_by": ["parity", "source"],
                "pruning": {"ratios": [0.8]},
            },
        ).json()
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


def test_several_methods_with_fine_tuning_and_pruned_weights_round_trip(embedded_stack, digits_case):
    """One spec compares global vs layer-wise magnitude vs channel L1 (+ fine-tuned and gradual magnitude);
    each run reports its achieved compression, and a downloaded pruned model re-uploads and evaluates to
    the same per-group metrics."""
    methods = [
        {"method": "magnitude", "scope": "global"},
        {"method": "magnitude", "scope": "layerwise"},
        {"method": "channel", "norm": "l1", "scope": "layerwise"},
        {"method": "magnitude", "scope": "global", "fine_tuning": {"epochs": 2, "lr": 0.01}},
        {
            "method": "magnitude",
            "scope": "global",
            "schedule": "gradual",
            "pruning_steps": 2,
            "fine_tuning": {"epochs": 1, "lr": 0.01},
        },
    ]
    with embedded_stack.client() as client:
        model = digits_case.upload_model(client).json()
        dataset = digits_case.upload_dataset(client).json()
        train = digits_case.upload_train_dataset(client).json()
        created = client.post(
            "/v1/audits",
            json={
                "model_id": model["id"],
                "dataset_id": dataset["id"],
                "train_dataset_id": train["id"],
                "group_by": ["digit"],
                "pruning": {"ratios": [0.5, 0.8], "methods": methods},
                "diagnostics": {"curvature": "off"},
                "statistics": {"bootstrap_resamples": 0},
            },
        )
        assert created.status_code == 202, created.text
        audit = wait_for_audit(client, created.json()["id"], timeout_s=300)
        assert audit["status"] == "succeeded", (audit, embedded_stack.log("worker"))
        report = client.get(f"/v1/audits/{audit['id']}/report").json()
        labels = [run["label"] for run in report["runs"]]
        assert labels == [
            label
            for label in [
                "magnitude-global",
                "magnitude-layerwise",
                "channel-layerwise-l1",
                "magnitude-global-finetuned",
                "magnitude-global-gradual",
            ]
            for _ratio in (0.5, 0.8)
        ]
        dense_parameters = report["dense"]["compression"]["dense"]["parameters"]
        by_label = {(run["label"], run["ratio"]): run for run in report["runs"]}
        for (label, ratio), run in by_label.items():
            assert run["recipe"]["ratio"] == ratio and run["recipe"]["method"]["method"] == run["method"]
            assert len(run["attributes"][0]["groups"]) == 10
            if label.startswith("channel"):
                # Physically smaller: fewer parameters and MACs, R̂ undefined and said so.
                assert run["compression"]["pruned"]["parameters"] < dense_parameters
                assert run["compression"]["pruned"]["macs"] < run["compression"]["dense"]["macs"]
                assert run["compression"]["pruned"]["latency_s_batch_64"] > 0
                assert run["compression"]["ratios"]["parameters"] > 1
                assert run["delta_norm"] is None and "predicted_excessive_loss" in run["notes"]
            else:
                # Default dense layers (first and last linear) are untouched; the rest hits the ratio.
                assert run["recipe"]["ignored_layers"] == ["layers.0", "layers.4"]
                assert set(run["layer_sparsity"]) == {"layers.2.weight"}
                layer = run["layer_sparsity"]["layers.2.weight"]
                assert layer["zeros"] == round(ratio * layer["numel"])
                assert run["compression"]["pruned"]["nonzero_parameters"] < dense_parameters
        # Fine-tuning on the train split recovers accuracy the one-shot pruned model lost at 80%.
        assert (
            by_label[("magnitude-global-finetuned", 0.8)]["overall"]["accuracy"]
            >= by_label[("magnitude-global", 0.8)]["overall"]["accuracy"]
        )

        dense_weights = client.get(f"/v1/audits/{audit['id']}/runs/{report['dense']['id']}/weights")
        assert dense_weights.status_code == 404 and "dense baseline" in dense_weights.json()["detail"]
        assert client.get(f"/v1/audits/{audit['id']}/runs/nope/recipe").status_code == 404
        chosen = by_label[("magnitude-global-finetuned", 0.8)]
        weights = client.get(chosen["weights_url"])
        assert weights.status_code == 200
        recipe = client.get(chosen["weights_url"].replace("/weights", "/recipe")).json()
        assert recipe == chosen["recipe"]
        again = digits_case.upload_model(client, weights=weights.content, architecture=recipe["architecture"]).json()
        rerun = client.post(
            "/v1/audits",
            json={
                "model_id": again["id"],
                "dataset_id": dataset["id"],
                "group_by": ["digit"],
                "pruning": {"ratios": [0.1]},
                "diagnostics": {"curvature": "off"},
            },
        ).json()
        rerun = wait_for_audit(client, rerun["id"])
        assert rerun["status"] == "succeeded", rerun
        dense_again = client.get(f"/v1/audits/{rerun['id']}/report").json()["dense"]
        # The channel-pruned model re-uploads with its recipe's "pruned" architecture as well.
        channel = by_label[("channel-layerwise-l1", 0.8)]
        channel_model = digits_case.upload_model(
            client, weights=client.get(channel["weights_url"]).content, architecture=channel["recipe"]["architecture"]
        )
        assert channel_model.status_code == 201, channel_model.text
        assert channel_model.json()["parameter_count"] == channel["compression"]["pruned"]["parameters"]
        channel_rerun = client.post(
            "/v1/audits",
            json={
                "model_id": channel_model.json()["id"],
                "dataset_id": dataset["id"],
                "group_by": ["digit"],
                "pruning": {"ratios": [0.1], "methods": [{"method": "channel"}]},
                "diagnostics": {"curvature": "off"},
            },
        ).json()
        channel_rerun = wait_for_audit(client, channel_rerun["id"])
        assert channel_rerun["status"] == "succeeded", channel_rerun
        channel_again = client.get(f"/v1/audits/{channel_rerun['id']}/report").json()["dense"]
    for original, again in ((chosen, dense_again), (channel, channel_again)):
        assert again["overall"]["accuracy"] == original["overall"]["accuracy"]
        before = {g["group"]: (g["accuracy"], g["loss"]) for g in original["attributes"][0]["groups"]}
        after = {g["group"]: (g["dense_accuracy"], g["dense_loss"]) for g in again["attributes"][0]["groups"]}
        assert before.keys() == after.keys()
        for group, (accuracy, loss) in before.items():
            assert after[group][0] == accuracy and after[group][1] == pytest.approx(loss, rel=1e-9)


def test_cancel_a_running_audit_stops_at_the_next_checkpoint(embedded_stack, digits_case):
    import time

    with embedded_stack.client() as client:
        model = digits_case.upload_model(client).json()
        dataset = digits_case.upload_dataset(client).json()
        train = digits_case.upload_train_dataset(client).json()
        audit = client.post(
            "/v1/audits",
            json={
                "model_id": model["id"],
                "dataset_id": dataset["id"],
                "train_dataset_id": train["id"],
                "group_by": ["digit"],
                "diagnostics": {"curvature": "off"},
                "pruning": {"ratios": [0.5, 0.9], "methods": [{"fine_tuning": {"epochs": 1000, "lr": 0.001}}]},
            },
        ).json()
        deadline = time.monotonic() + 120
        while "epoch" not in (client.get(f"/v1/audits/{audit['id']}").json()["progress_message"] or ""):
            assert time.monotonic() < deadline, "the audit never started fine-tuning"
            time.sleep(0.2)
        asked = client.post(f"/v1/audits/{audit['id']}/cancel").json()
        assert asked["status"] == "running" and asked["cancel_requested"]
        started = time.monotonic()
        ended = wait_for_audit(client, audit["id"], timeout_s=60)
        assert ended["status"] == "cancelled", ended
        assert time.monotonic() - started < 30  # stopped at an epoch checkpoint, not after 1000 epochs
        assert client.get(f"/v1/audits/{audit['id']}/report").status_code == 409


@pytest.mark.services
def test_metrics_and_readiness_on_postgres_and_redis(services_stack, postgres_url):
    """/metrics reads PostgreSQL (its own spelling of a run's duration) and /readyz PINGs the real Redis."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    from sqlalchemy import create_engine, text

    assert httpx.get(f"{services_stack.url}/readyz", timeout=30).status_code == 200
    scraped = httpx.get(f"{services_stack.url}/metrics", timeout=30)
    assert scraped.status_code == 200, scraped.text
    families = {family.name: family.samples for family in text_string_to_metric_families(scraped.text)}
    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        statuses = dict(connection.execute(text("SELECT status, count(*) FROM audits GROUP BY status")).all())
        runs, seconds = connection.execute(
            text(
                "SELECT count(*), coalesce(sum(extract(epoch FROM finished_at - started_at)), 0) FROM runs "
                "WHERE status = 'succeeded' AND method = 'magnitude'"
            )
        ).one()
    engine.dispose()
    assert {s.labels["status"]: s.value for s in families["pruneaudit_audits"] if s.value} == statuses
    durations = {s.name: s.value for s in families["pruneaudit_run_duration_seconds"]}
    assert durations.get("pruneaudit_run_duration_seconds_count", 0) == runs
    assert durations.get("pruneaudit_run_duration_seconds_sum", 0) == pytest.approx(float(seconds))
    assert [s.value for s in families["pruneaudit_database_up"]] == [1]
