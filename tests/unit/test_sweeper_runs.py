"""The sweeper's run rules on a real SQLite database and SQLite broker (no worker): a stale run is re-queued
alone and sent again, a stale run at the attempt cap fails with its audit (queued runs stopped), a queued run
with no broker message is sent again only once its prerequisite has succeeded, and the work directories of
ended audits are removed, and so are the leftovers of killed processes (service/janitor.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from service import db, queue, storage
from service.models import Audit, AuditStatus, Dataset, Model, Run, RunStatus, Tenant, utcnow
from service.settings import get_settings

REPO = Path(__file__).resolve().parents[2]
CACHES = (get_settings, db.get_engine, db.get_sessionmaker, storage.get_store, queue.get_celery_client)


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEAUDIT_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("PRUNEAUDIT_HEARTBEAT_INTERVAL_S", "1")
    monkeypatch.setenv("PRUNEAUDIT_HEARTBEAT_TIMEOUT_S", "5")
    monkeypatch.setenv("PRUNEAUDIT_REQUEUE_QUEUED_AFTER_S", "5")
    monkeypatch.setenv("PRUNEAUDIT_MAX_ATTEMPTS", "2")
    for cache in CACHES:
        cache.cache_clear()
    from service.migrate import upgrade_to_head

    upgrade_to_head()
    queue.declare_queue()
    yield get_settings()
    db.get_engine().dispose()
    for cache in CACHES:
        cache.cache_clear()


def make_audit(session, runs: list[dict]) -> str:
    tenant = Tenant(name=f"t-{utcnow().timestamp()}")
    session.add(tenant)
    session.flush()
    model = Model(
        tenant_id=tenant.id,
        sha256="0" * 64,
        size_bytes=1,
        architecture={},
        architecture_name="mlp",
        parameter_count=1,
        input_shape=[1],
        num_classes=2,
    )
    dataset = Dataset(
        tenant_id=tenant.id,
        sha256="0" * 64,
        format="npz",
        size_bytes=1,
        rows=1,
        feature_shape=[1],
        classes=[],
        groups={},
    )
    session.add_all([model, dataset])
    session.flush()
    long_ago = utcnow() - timedelta(minutes=10)
    audit = Audit(
        tenant_id=tenant.id,
        model_id=model.id,
        dataset_id=dataset.id,
        spec={},
        status=AuditStatus.running,
        attempts=1,
        runs_queued_at=long_ago,
        heartbeat_at=long_ago,
    )
    session.add(audit)
    session.flush()
    for position, run in enumerate(runs):
        session.add(
            Run(
                audit_id=audit.id,
                position=position,
                method="magnitude",
                ratio=0.5,
                label=f"run-{position}",
                **{"updated_at": long_ago, **run},
            )
        )
    return audit.id


def statuses(audit_id: str) -> tuple[AuditStatus, list[tuple[RunStatus, int]]]:
    with db.session_scope() as session:
        audit = session.get_one(Audit, audit_id)
        return audit.status, [(run.status, run.attempts) for run in audit.runs]


def sent_run_ids(settings) -> set[str]:
    from service.recovery import ids_in, live_messages

    return ids_in(live_messages(settings) or [], queue.COMPUTE_RUN_TASK)


def test_stale_runs_are_requeued_alone_or_fail_their_audit_at_the_cap(embedded):
    from service.recovery import sweep

    long_ago = utcnow() - timedelta(minutes=10)
    with db.session_scope() as session:
        requeued = make_audit(
            session,
            [
                dict(status=RunStatus.succeeded, attempts=1, result={}),
                dict(status=RunStatus.running, attempts=1, heartbeat_at=long_ago),
                dict(status=RunStatus.running, attempts=1, heartbeat_at=utcnow()),  # alive
            ],
        )
        failed = make_audit(
            session,
            [
                dict(status=RunStatus.succeeded, attempts=1, result={}),
                dict(status=RunStatus.running, attempts=2, heartbeat_at=long_ago),
                dict(status=RunStatus.queued, attempts=0, updated_at=utcnow()),
            ],
        )
    outcome = sweep(embedded)
    assert statuses(requeued) == (
        AuditStatus.running,
        [(RunStatus.succeeded, 1), (RunStatus.queued, 1), (RunStatus.running, 1)],
    )
    assert statuses(failed) == (
        AuditStatus.failed,
        [(RunStatus.succeeded, 1), (RunStatus.failed, 2), (RunStatus.cancelled, 0)],
    )
    with db.session_scope() as session:
        error = session.scalar(select(Audit.error).where(Audit.id == failed))
        requeued_run = session.scalar(select(Run.id).where(Run.audit_id == requeued, Run.position == 1))
    assert error.startswith("run run-1: the worker running this run vanished 2 times")
    assert outcome.runs_requeued == [requeued_run] and len(outcome.runs_failed) == 1
    assert requeued_run in sent_run_ids(embedded)
    assert not outcome.requeued  # the audits themselves are not re-queued: their runs were queued
    assert sweep(embedded).runs_requeued == []  # a second sweeper finds nothing to do


def test_queued_runs_without_a_message_are_sent_once_they_can_start(embedded):
    from service.recovery import sweep

    with db.session_scope() as session:
        audit_id = make_audit(
            session,
            [
                dict(status=RunStatus.succeeded, attempts=1, result={}),
                dict(status=RunStatus.queued, attempts=0),
                dict(status=RunStatus.queued, attempts=0, starts_from=1),  # waits for run 1
            ],
        )
        runs = dict(session.execute(select(Run.position, Run.id).where(Run.audit_id == audit_id)).all())
    outcome = sweep(embedded)
    assert outcome.runs_resent == [runs[1]]
    assert sent_run_ids(embedded) == {runs[1]}
    assert sweep(embedded).runs_resent == []  # its message is there now (and updated_at was bumped)


def test_work_directories_of_ended_audits_are_removed(embedded):
    from service.recovery import sweep

    with db.session_scope() as session:
        running = make_audit(session, [dict(status=RunStatus.succeeded, attempts=1, result={})])
        ended = make_audit(session, [dict(status=RunStatus.succeeded, attempts=1, result={})])
        session.get_one(Audit, ended).status = AuditStatus.succeeded
    store = storage.get_store()
    for audit_id in (running, ended):
        store.work_dir(audit_id, 1).mkdir(parents=True)
    assert sweep(embedded).work_removed == [ended]
    assert store.work_audit_ids() == [running]


def killed_while_holding(store_root, code: str) -> None:
    """Run `code` (with `store` a BlobStore on `store_root`) in a process that then kills itself with SIGKILL."""
    script = "\n".join(
        [
            "import os, pathlib, signal, tempfile",
            "from service.storage import BlobStore",
            "from service.temp_names import temp_prefix",
            f"store = BlobStore(pathlib.Path({str(store_root)!r}))",
            code,
            "os.kill(os.getpid(), signal.SIGKILL)",
        ]
    )
    died = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert died.returncode == -signal.SIGKILL, died.stderr


def test_leftovers_of_killed_processes_are_removed(embedded):
    """Item 4 of issue #16: what kill -9 leaves under blobs/ is found by the sweeper's janitor."""
    from service.recovery import sweep
    from service.temp_names import temp_prefix

    store = storage.get_store()
    tmp, datasets = store.root / "tmp", store.root / "datasets"
    # A staged upload and a run's output directory whose processes were killed: their names say whose they were.
    killed_while_holding(store.root, "store.temp_path(kind='upload')")
    killed_while_holding(
        store.root,
        "d = tempfile.mkdtemp(dir=store.root / 'tmp', prefix=temp_prefix('run'))\n"
        "open(os.path.join(d, 'run-3.safetensors'), 'wb').write(b'0' * 1000)",
    )
    dead = sorted(path.name for path in tmp.iterdir())
    assert [name.split("~")[0] for name in dead] == ["run", "upload"]
    live = store.temp_path(".safetensors")  # this process's: kept, however old
    old_unowned, young_unowned = tmp / "tmpold", tmp / "tmpyoung"
    old_unowned.write_bytes(b"x")
    young_unowned.write_bytes(b"x")
    with db.session_scope() as session:
        make_audit(session, [])
        recorded = session.scalars(select(Dataset.id)).one()
    for dataset_id in ("orphan", "young-orphan", recorded):
        (datasets / dataset_id).mkdir(parents=True)
        (datasets / dataset_id / "y.npy").write_bytes(b"y")
        (datasets / dataset_id / "x.npy.tmp").write_bytes(b"half")
    long_ago = time.time() - embedded.leftover_age_s - 60
    for path in (live, old_unowned, *(datasets / "orphan").iterdir(), datasets / "orphan", datasets / recorded):
        os.utime(path, (long_ago, long_ago))
    os.utime(datasets / recorded / "x.npy.tmp", (long_ago, long_ago))

    removed = sweep(embedded).leftovers_removed
    assert sorted(removed) == sorted(
        [*(f"tmp/{name}" for name in dead), "tmp/tmpold", "datasets/orphan", f"datasets/{recorded}/x.npy.tmp"]
    )
    assert sorted(path.name for path in tmp.iterdir()) == sorted([live.name, "tmpyoung"])
    assert sorted(path.name for path in datasets.iterdir()) == sorted(["young-orphan", recorded])
    assert [path.name for path in (datasets / recorded).iterdir()] == ["y.npy"]
    assert sweep(embedded).leftovers_removed == []
    assert live.name.startswith(temp_prefix("weights"))
