"""DELETE of models, datasets and audits on the real stack, embedded and on PostgreSQL + Redis: an input an audit
(or a schedule) uses is refused with 409 naming it; a queued or running audit is refused (cancel first); deleting
the audit revokes its share link and removes its blobs, while a blob another row still references stays; another
tenant's id is 404. Then retention: the sweeper deletes audits past PRUNEAUDIT_AUDIT_RETENTION_DAYS."""

from __future__ import annotations

import time
from contextlib import nullcontext

import httpx
import pytest

from tests.conftest import throwaway_postgres
from tests.integration.stack import (
    DEPLOYMENTS,
    assert_problem,
    start_deployment,
    start_process,
    wait_for_audit,
)

SPEC = {
    "group_by": ["digit"],
    "pruning": {"ratios": [0.5]},
    "diagnostics": {"curvature": "off"},
    "statistics": {"bootstrap_resamples": 0},
}


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def stack(request, tmp_path_factory):
    """Both deployments; on PostgreSQL a database of its own: a blob goes when no row of its database references it,
    and the session's database holds other modules' rows for the same model and pruned weights."""
    own_database = throwaway_postgres("pruneaudit_deletion") if request.param == "postgres-redis" else nullcontext()
    with own_database as database_url:
        stack = start_deployment(request, tmp_path_factory.mktemp("deletion"), database_url)
        yield stack
        stack.stop()


def blobs(stack) -> set[str]:
    return {path.name for path in (stack.var_dir / "blobs" / "sha256").glob("*/*")}


def audit_of(client, digits_case) -> tuple[dict, dict]:
    model = digits_case.upload_model(client).json()
    dataset = digits_case.upload_dataset(client).json()
    audit = client.post("/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"], **SPEC}).json()
    return model, {**dataset, "audit_id": audit["id"]}


def test_inputs_in_use_are_refused_then_deleting_the_audit_frees_them(stack, digits_case):
    with stack.client() as client, stack.client(stack.new_key("deletion-other")) as other:
        model, dataset = audit_of(client, digits_case)
        audit_id = dataset["audit_id"]
        refused = client.delete(f"/v1/audits/{audit_id}")  # just queued (or already running)
        assert_problem(refused, 409, "cancel it first")
        audit = wait_for_audit(client, audit_id)
        assert audit["status"] == "succeeded", (audit, stack.log("worker"))
        share_link = audit["report_html_url"]
        assert httpx.get(share_link).status_code == 200
        before = blobs(stack)
        # The same bytes uploaded again: one blob, two models.
        twin = digits_case.upload_model(client).json()
        assert twin["sha256"] == model["sha256"] and blobs(stack) == before

        assert_problem(client.delete(f"/v1/datasets/{dataset['id']}"), 409, audit_id, "delete those first")
        assert_problem(client.delete(f"/v1/models/{model['id']}"), 409, audit_id)
        for path in (f"/v1/audits/{audit_id}", f"/v1/models/{model['id']}", f"/v1/datasets/{dataset['id']}"):
            assert_problem(other.delete(path), 404, "does not exist")

        assert client.delete(f"/v1/audits/{audit_id}").status_code == 204
        assert_problem(client.get(f"/v1/audits/{audit_id}"), 404)
        assert httpx.get(share_link).status_code == 404  # the share link is revoked with the audit
        assert_problem(client.delete(f"/v1/audits/{audit_id}"), 404)
        left = blobs(stack)
        assert model["sha256"] in left  # still the model's
        assert len(before - left) >= 2  # the run's pruned weights and the HTML report went

        # A schedule naming the dataset by id keeps it too, until the schedule goes.
        spec = {"model_id": model["id"], "dataset_id": dataset["id"], **SPEC}
        schedule = client.post("/v1/schedules", json={"spec": spec, "cron": "0 2 * * *"}).json()
        assert_problem(client.delete(f"/v1/datasets/{dataset['id']}"), 409, f"schedule(s) {schedule['id']}")
        assert client.delete(f"/v1/schedules/{schedule['id']}").status_code == 204
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert not (stack.var_dir / "blobs" / "datasets" / dataset["id"]).exists()
        assert client.delete(f"/v1/models/{model['id']}").status_code == 204
        assert model["sha256"] in blobs(stack)  # the twin still references it
        assert client.get(f"/v1/models/{twin['id']}").status_code == 200
        assert client.delete(f"/v1/models/{twin['id']}").status_code == 204
        assert model["sha256"] not in blobs(stack)
        assert_problem(client.get(f"/v1/models/{model['id']}"), 404)


def test_the_sweeper_deletes_audits_past_their_retention(stack, digits_case):
    with stack.client() as client:
        _model, dataset = audit_of(client, digits_case)
        assert wait_for_audit(client, dataset["audit_id"])["status"] == "succeeded", stack.log("worker")
        stack.env = {**stack.env, "PRUNEAUDIT_AUDIT_RETENTION_DAYS": "1e-6", "PRUNEAUDIT_SWEEP_INTERVAL_S": "0.3"}
        start_process(stack, "sweeper", ["sweeper"])
        deadline = time.monotonic() + 30
        while client.get(f"/v1/audits/{dataset['audit_id']}").status_code != 404:
            assert time.monotonic() < deadline, stack.log("sweeper")
            time.sleep(0.3)
        # Its dataset is free again: retention removed the audit the way DELETE does.
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
