"""Operations on real processes: Prometheus `/metrics` across two API processes of one stack (request counts add up,
audits by status match the database), JSON logs whose request id travels from the API into the worker's lines for
the same audit, and `/readyz` naming the broker when it cannot be reached."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import assert_problem, free_port, start_api, start_stack, wait_for_audit


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("operations"), settings={"PRUNEAUDIT_LOG_FORMAT": "json"})
    stack.second_url = start_api(stack, "api2")  # type: ignore[attr-defined]
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def traced_audit(stack, digits_case):
    """One finished audit, created with a caller's X-Request-ID."""
    request_id = f"ci-{uuid.uuid4().hex}"
    with stack.client() as client:
        model = digits_case.upload_model(client).json()
        dataset = digits_case.upload_dataset(client).json()
        created = client.post(
            "/v1/audits",
            headers={"X-Request-ID": request_id},
            json={
                "model_id": model["id"],
                "dataset_id": dataset["id"],
                "group_by": ["digit"],
                "pruning": {"ratios": [0.5], "methods": [{"method": "magnitude", "scope": "global"}]},
                "diagnostics": {"curvature": "off"},
                "statistics": {"bootstrap_resamples": 0},
            },
        )
        assert created.status_code == 202, created.text
        assert created.headers["x-request-id"] == request_id
        audit = wait_for_audit(client, created.json()["id"])
    assert audit["status"] == "succeeded", (audit, stack.log("worker"))
    return audit["id"], request_id


def scrape(url: str) -> dict:
    """{metric family name: [(sample name, labels, value)]} as Prometheus's parser reads the exposition."""
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(response.text)
    }


def requests_of(metrics: dict, route: str, status: str) -> float:
    return sum(
        value
        for name, labels, value in metrics["pruneaudit_http_requests"]
        if name == "pruneaudit_http_requests_total" and labels["route"] == route and labels["status"] == status
    )


@pytest.mark.slow
def test_metrics_add_up_across_api_processes_and_match_the_database(stack, traced_audit):
    route = "/v1/audits/{audit_id}"
    before = requests_of(scrape(stack.url), route, "404")
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    for url, times in ((stack.url, 3), (stack.second_url, 2)):
        with httpx.Client(base_url=url, headers={"X-API-Key": stack.api_key}) as client:
            for _ in range(times):
                assert client.get(f"/v1/audits/{missing}").status_code == 404
    first, second = scrape(stack.url), scrape(stack.second_url)
    # Either process answers for both: 3 requests to one and 2 to the other, counted once each.
    assert requests_of(first, route, "404") == requests_of(second, route, "404") == before + 5
    # By route template, never the raw path.
    assert not any(missing in labels["route"] for _n, labels, _v in first["pruneaudit_http_requests"])
    latency = {
        (labels["route"], name): value
        for name, labels, value in first["pruneaudit_http_request_duration_seconds"]
        if labels["method"] == "GET"
    }
    assert latency[(route, "pruneaudit_http_request_duration_seconds_count")] >= 5
    assert "/metrics" not in httpx.get(f"{stack.url}/openapi.json").json()["paths"]

    database = sqlite3.connect(stack.var_dir / "pruneaudit.sqlite")
    try:
        statuses = dict(database.execute("SELECT status, count(*) FROM audits GROUP BY status").fetchall())
        succeeded_runs = database.execute(
            "SELECT count(*) FROM runs WHERE status = 'succeeded' AND method = 'magnitude'"
        ).fetchone()[0]
    finally:
        database.close()
    by_status = {labels["status"]: value for _n, labels, value in first["pruneaudit_audits"]}
    assert {status: count for status, count in by_status.items() if count} == statuses
    assert statuses.get("succeeded", 0) >= 1
    durations = {name: value for name, labels, value in first["pruneaudit_run_duration_seconds"]}
    assert durations["pruneaudit_run_duration_seconds_count"] == succeeded_runs >= 1
    assert durations["pruneaudit_run_duration_seconds_sum"] > 0
    assert first["pruneaudit_oldest_queued_audit_age_seconds"][0][2] == 0.0  # nothing waits


def json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):  # a line of a traceback or banner that starts with "{"
                lines.append(json.loads(line))
    return lines


@pytest.mark.slow
def test_request_id_travels_from_api_to_worker_logs(stack, traced_audit):
    audit_id, request_id = traced_audit
    api = [line for line in json_lines(stack.log("api")) if line.get("request_id") == request_id]
    worker = [line for line in json_lines(stack.log("worker")) if line.get("request_id") == request_id]
    assert any(line["logger"] == "pruneaudit.access" and "POST /v1/audits" in line["message"] for line in api), api
    assert all({"time", "level", "logger", "message"} <= set(line) for line in api + worker)
    # The baseline task (sent by the API) and the run it queued (sent by the worker) both carry it.
    assert any(line.get("audit_id") == audit_id and "claimed" in line["message"] for line in worker), worker
    assert any(line["message"].startswith("run ") and audit_id in line["message"] for line in worker), worker
    # A generated id when the caller sends none (or one unfit for logs), returned to the caller.
    with stack.client() as client:
        generated = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert len(generated) == 32 and generated != request_id


def test_readyz_names_the_unreachable_broker(tmp_path):
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    stack = start_stack(tmp_path / "no-broker", with_worker=False, broker_url=dead_redis, ready_path="/healthz")
    try:
        response = httpx.get(f"{stack.url}/readyz", timeout=30)
        body = assert_problem(response, 503, "broker redis://127.0.0.1", "cannot be reached")
        assert body["type"].endswith("/broker-unavailable") and body["title"] == "Broker unavailable"
        # /metrics still answers: the database figures do not need the broker.
        assert httpx.get(f"{stack.url}/metrics", timeout=30).status_code == 200
    finally:
        stack.stop()
