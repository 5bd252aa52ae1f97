"""The two tasks. `run_audit` claims the audit, measures and stores the dense baseline, and queues one run per
plan; `compute_run` claims one run (on any worker, on any host sharing the database, broker and blob store),
computes it from the stored baseline and stores it; the last run to succeed writes the report
(worker/assembly.py). The database rows are the source of truth; every state change is a conditional UPDATE
matching the attempt, so a duplicate delivery is a no-op."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from service.db import session_scope
from service.logs import current_request_id
from service.models import Audit, Dataset, Run, RunStatus, utcnow
from service.queue import COMPUTE_RUN_TASK, RUN_AUDIT_TASK, enqueue_run
from service.settings import get_settings
from service.storage import get_store
from service.temp_names import temp_prefix
from worker.assembly import queue_runs, store_run
from worker.celery_app import app
from worker.deliveries import announce_end
from worker.engine.errors import EngineError
from worker.inputs import AuditInputs, RunPlan, audit_inputs, graph_path
from worker.leases import AttemptSuperseded, AuditCancelled, AuditLease, RunLease, claim_audit, claim_run
from worker.placement import forwarded, placement

if TYPE_CHECKING:
    import torch

    from worker.pipeline.mitigations import SavedRun

log = logging.getLogger(__name__)


def pipeline_inputs(audit: Audit, output_dir: Path) -> AuditInputs:
    train_id = audit.spec["train_dataset_id"]
    session = object_session(audit)
    assert session is not None, "pipeline_inputs takes an audit loaded by an open session"
    train_dataset = session.get(Dataset, train_id) if train_id else None
    return audit_inputs(audit, train_dataset, get_store(), output_dir, get_settings().device)


def worker_name(task: Task) -> str:
    """Which worker computed a run: the Celery node name (celery@host) and the pool child's pid."""
    return f"{task.request.hostname or socket.gethostname()}:{os.getpid()}"


def send_run(run_id: str, queue: str) -> None:
    try:
        enqueue_run(run_id, queue)
    except Exception:
        # It stays queued; the sweeper finds it without a broker message and sends it again.
        log.exception("run %s: could not enqueue; the sweeper will send it again", run_id)


@contextmanager
def task_outcome(lease: AuditLease | RunLease, time_limit_s: int) -> Iterator[None]:
    """How a task's work ends: every failure is written to its row with a reason (and, for a run, to its audit);
    the audit's work files are removed when that ended the audit."""
    ended = False
    try:
        yield
    except AttemptSuperseded:
        log.warning("%s no longer owns its row (re-queued or ended); its work is dropped", lease)
    except AuditCancelled:
        ended = lease.stop()
    except EngineError as exc:
        ended = lease.fail(str(exc))
    except SoftTimeLimitExceeded:
        ended = lease.fail(f"{lease.subject} exceeded the time limit of {time_limit_s} s")
    except MemoryError:
        ended = lease.fail("the worker ran out of memory; use a smaller model, dataset or batch_size")
    except Exception:
        # The exception (SQL, parameters, paths) is for the operator's log, never for the client.
        log.exception("%s of audit %s failed", lease, lease.audit_id)
        ended = lease.fail(internal_error_message(lease.audit_id))
    if ended:
        get_store().remove_work(lease.audit_id)
        announce_end(lease.audit_id)


def internal_error_message(audit_id: str) -> str:
    request = f", request {request_id}" if (request_id := current_request_id()) else ""
    return (
        f"an internal error stopped it (audit {audit_id}{request}); the details are in the worker's log, "
        "under these ids: report them to the operator"
    )


def heartbeat(lease: AuditLease | RunLease):
    # torch is imported in the child that runs the task, not in the worker's parent process.
    from worker.heartbeat import AttemptHeartbeat

    settings = get_settings()
    return AttemptHeartbeat(
        lease, interval_s=settings.heartbeat_interval_s, max_memory_mb=settings.worker_max_memory_mb
    )


def forwarded_to_gpu(task_name: str, row_id: str) -> bool:
    with session_scope() as session:
        return forwarded(session, task_name, row_id)


@app.task(name=RUN_AUDIT_TASK, bind=True)
def run_audit(self: Task, audit_id: str) -> None:
    if forwarded_to_gpu(RUN_AUDIT_TASK, audit_id):
        return
    lease = claim_audit(audit_id)
    if lease is None:
        log.info("audit %s is not queued (already claimed or gone); nothing to do", audit_id)
        return
    log.info("audit %s: claimed (attempt %d); measuring the dense baseline", audit_id, lease.attempt)
    from worker.pipeline.runner import measure_baseline

    work_dir = get_store().work_dir(audit_id, lease.attempt)
    ready: list[tuple[str, int]] = []
    with task_outcome(lease, get_settings().audit_time_limit_s), heartbeat(lease):
        with session_scope() as session:
            audit = session.get_one(Audit, audit_id)
            inputs, queues = pipeline_inputs(audit, work_dir), placement(session, audit)
        lease.checkpoint(0.0, "measuring the dense baseline")
        started_at = utcnow()
        dense = measure_baseline(inputs, work_dir)
        ready = queue_runs(lease, inputs.plans(), dense, worker_name(self), started_at)
    for run_id, position in ready:
        send_run(run_id, queues.run_queue(inputs.plan_at(position)))


def starts_from(
    session: Session, lease: RunLease, plan: RunPlan, work_dir: Path
) -> Callable[[torch.device], SavedRun] | None:
    """For a mitigation placed 'after' pruning: a loader of its unmitigated run's saved model, masks and recipe."""
    if plan.starts_from is None:
        return None
    from worker.pipeline.work_files import load_unmitigated

    attempt, weights_sha256 = session.execute(
        select(Run.attempts, Run.weights_sha256).where(
            Run.audit_id == lease.audit_id, Run.position == plan.starts_from, Run.status == RunStatus.succeeded
        )
    ).one()
    assert weights_sha256 is not None, "an unmitigated run stores its weights when it succeeds"
    store = get_store()
    position = plan.starts_from

    def load(device: torch.device) -> SavedRun:  # on the run's device, which the runner picks
        saved = load_unmitigated(work_dir, position, attempt, store.blob_path(weights_sha256), device)
        return replace(saved, graph_path=graph_path(store, saved.recipe["architecture"]))

    return load


@app.task(name=COMPUTE_RUN_TASK, bind=True)
def compute_run(self: Task, run_id: str) -> None:
    if forwarded_to_gpu(COMPUTE_RUN_TASK, run_id):
        return
    lease = claim_run(run_id, worker_name(self))
    if lease is None:
        log.info("run %s cannot start (already claimed, its audit stopped, or waiting); nothing to do", run_id)
        return
    log.info("run %s of audit %s: claimed (%s)", run_id, lease.audit_id, lease.label)
    from worker.pipeline import runner
    from worker.pipeline.work_files import save_unmitigated

    store = get_store()
    work_dir = store.work_dir(lease.audit_id, lease.audit_attempt)
    stored = None
    with (
        task_outcome(lease, get_settings().run_time_limit_s),
        heartbeat(lease),
        tempfile.TemporaryDirectory(dir=store.root / "tmp", prefix=temp_prefix("run")) as output_dir,
    ):
        with session_scope() as session:
            audit = session.get_one(Audit, lease.audit_id)
            inputs, queues = pipeline_inputs(audit, Path(output_dir)), placement(session, audit)
            plan = inputs.plan_at(lease.position)
            unmitigated = starts_from(session, lease, plan, work_dir)
        assert plan.label == lease.label, "plans follow from the spec alone"
        output, kept, environment = runner.compute_run(
            inputs, work_dir, plan, unmitigated, lambda epoch, _loss: lease.checkpoint(f"epoch {epoch}")
        )
        if any(other.starts_from == plan.position for other in inputs.plans()):
            save_unmitigated(kept, work_dir, plan.position, lease.attempt)
        assert output.weights_path is not None, "every planned run writes its weights"
        stored = store_run(lease, output.result, output.weights_path, environment)
    if stored is None:
        return
    for dependent, position in stored.dependents:
        send_run(dependent, queues.run_queue(inputs.plan_at(position)))
    if stored.assembled:
        store.remove_work(lease.audit_id)
        announce_end(lease.audit_id)
