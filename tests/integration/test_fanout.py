"""Runs fanned out across workers, on the embedded stack (SQLite database, SQLite broker) with two worker
processes: one audit's runs are computed by both, each once, and the report says which worker computed each;
mitigations placed 'after' pruning wait for their unmitigated run; a cancel while runs are queued computes none
of them."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.integration.stack import start_process, start_stack, wait_for_audit


def wait_ready(stack, name: str, timeout_s: float = 120) -> None:
    """Celery logs 'ready.' once its pool takes tasks."""
    deadline = time.monotonic() + timeout_s
    while " ready." not in stack.log(name):
        assert stack.processes[name].poll() is None, stack.log(name)
        assert time.monotonic() < deadline, f"{name} not ready:\n{stack.log(name)}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("fanout"))
    start_process(stack, "worker-2", ["worker", "--concurrency", "1"])
    try:
        wait_ready(stack, "worker")
        wait_ready(stack, "worker-2")
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def uploaded(two_workers, digits_case) -> dict:
    with two_workers.client() as client:
        return {
            "model_id": digits_case.upload_model(client).json()["id"],
            "dataset_id": digits_case.upload_dataset(client).json()["id"],
            "train_dataset_id": digits_case.upload_train_dataset(client).json()["id"],
            "group_by": ["digit"],
            "diagnostics": {"curvature": "off"},
            "statistics": {"bootstrap_resamples": 0},
        }


def assert_work_removed(stack, audit_id: str) -> None:
    """The stored baseline and masks are removed once the audit has ended (by the worker that ended it, just after
    its commit)."""
    work = stack.var_dir / "blobs" / "work" / audit_id
    deadline = time.monotonic() + 10
    while work.exists():
        assert time.monotonic() < deadline, list(work.rglob("*"))
        time.sleep(0.1)


def run_rows(stack, audit_id: str) -> list[dict]:
    with sqlite3.connect(stack.var_dir / "pruneaudit.sqlite") as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute(
            "SELECT position, label, status, attempts, worker, starts_from, started_at, error FROM runs "
            "WHERE audit_id = ? ORDER BY position",
            (audit_id,),
        ).fetchall()
    return [dict(row) for row in rows]


def test_one_audit_is_computed_by_both_workers(two_workers, uploaded):
    spec = {
        **uploaded,
        "pruning": {
            "ratios": [0.3, 0.5, 0.7, 0.9],
            "methods": [{"method": "magnitude", "scope": "global", "fine_tuning": {"epochs": 3, "lr": 0.001}}],
        },
        "mitigations": [{"name": "finetune", "epochs": 1}],
    }
    with two_workers.client() as client:
        created = client.post("/v1/audits", json=spec)
        assert created.status_code == 202, created.text
        audit = wait_for_audit(client, created.json()["id"], timeout_s=180)
        assert audit["status"] == "succeeded", (audit, two_workers.log("worker"), two_workers.log("worker-2"))
        assert audit["progress"] == 1.0 and audit["attempts"] == 1
        report = client.get(f"/v1/audits/{audit['id']}/report").json()
        html = client.get(f"/v1/audits/{audit['id']}/report.html")
        assert html.status_code == 200 and "<html" in html.text
    runs = report["runs"]
    assert [(run["ratio"], run["mitigation"]) for run in runs] == [
        (ratio, mitigation) for ratio in (0.3, 0.5, 0.7, 0.9) for mitigation in ("none", "finetune")
    ]
    workers = {run["worker"] for run in runs}
    assert len(workers) == 2 and None not in workers, workers
    assert report["dense"]["worker"]
    rows = run_rows(two_workers, audit["id"])
    assert {(row["status"], row["attempts"]) for row in rows} == {("succeeded", 1)}
    # Each mitigated run started from its unmitigated one (placement 'after'), whose masks it kept.
    for mitigated in (row for row in rows if row["label"].endswith("+finetune")):
        assert mitigated["starts_from"] == mitigated["position"] - 1
    for unmitigated, mitigated in zip(runs[::2], runs[1::2], strict=True):
        assert mitigated["achieved_sparsity"] == pytest.approx(unmitigated["achieved_sparsity"])
    assert_work_removed(two_workers, audit["id"])


def test_cancel_while_runs_are_queued_computes_none_of_them(two_workers, uploaded):
    spec = {
        **uploaded,
        "pruning": {
            "ratios": [0.3, 0.5, 0.7, 0.8, 0.9],
            "methods": [{"method": "magnitude", "scope": "global", "fine_tuning": {"epochs": 1000, "lr": 0.001}}],
        },
    }
    with two_workers.client() as client:
        audit_id = client.post("/v1/audits", json=spec).json()["id"]
        deadline = time.monotonic() + 120
        while sum(row["status"] == "running" for row in run_rows(two_workers, audit_id)) < 2:
            assert time.monotonic() < deadline, run_rows(two_workers, audit_id)
            time.sleep(0.2)
        asked = client.post(f"/v1/audits/{audit_id}/cancel").json()
        assert asked["status"] == "running" and asked["cancel_requested"]
        # Queued runs are stopped at once, before any worker could take them.
        queued = [row for row in run_rows(two_workers, audit_id) if row["started_at"] is None]
        assert len(queued) == 3 and {row["status"] for row in queued} == {"cancelled"}
        ended = wait_for_audit(client, audit_id, timeout_s=60)
    assert ended["status"] == "cancelled", ended
    rows = run_rows(two_workers, audit_id)
    assert rows[0]["status"] == "succeeded"  # the dense baseline
    assert {row["status"] for row in rows[1:]} == {"cancelled"}
    never_started = [row for row in rows[1:] if row["started_at"] is None]
    assert len(never_started) == 3 and all(row["attempts"] == 0 for row in never_started)
    assert all("not computed" in row["error"] for row in never_started)
    stopped = [row for row in rows[1:] if row["started_at"] is not None]
    assert len(stopped) == 2 and all("stopped" in row["error"] for row in stopped)
    assert_work_removed(two_workers, audit_id)
