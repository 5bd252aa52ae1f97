"""The one task: claim the audit row, run the pipeline, store results. The database row is the source of
truth; every state change is a conditional UPDATE, so a duplicate delivery is a no-op."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import object_session

from service.audits import assemble_report
from service.db import rows_matched, session_scope
from service.models import Audit, AuditStatus, Dataset, Run, utcnow
from service.queue import RUN_AUDIT_TASK
from service.settings import get_settings
from service.storage import get_store
from worker.celery_app import app
from worker.inputs import AuditInputs, audit_inputs

if TYPE_CHECKING:
    from worker.pipeline.runner import AuditOutput

log = logging.getLogger(__name__)


def claim(audit_id: str) -> int | None:
    """queued → running; returns this attempt's number, or None when another delivery got there first (or the
    audit ended). Every later write matches the attempt, so a worker that comes back after the sweeper
    re-queued its audit cannot write over the new attempt."""
    with session_scope() as session:
        claimed = rows_matched(
            session,
            update(Audit)
            .where(Audit.id == audit_id, Audit.status == AuditStatus.queued)
            .values(
                status=AuditStatus.running,
                attempts=Audit.attempts + 1,
                started_at=utcnow(),
                heartbeat_at=utcnow(),
                progress=0.0,
                progress_message="started",
                error=None,
            ),
        )
        if claimed != 1:
            return None
        # Read inside the claiming transaction, which holds the row.
        return session.scalar(select(Audit.attempts).where(Audit.id == audit_id))


class AuditCancelled(Exception):
    """Raised at a checkpoint when the audit was asked to stop."""


class AttemptSuperseded(Exception):
    """Raised at a checkpoint when this attempt no longer owns the audit (re-queued by the sweeper after its
    heartbeat went stale, or ended): its work is abandoned, never written."""


def report_progress(audit_id: str, attempt: int, fraction: float, message: str) -> None:
    """Progress, heartbeat and the cancellation checkpoint (called between runs and epochs)."""
    with session_scope() as session:
        written = rows_matched(
            session,
            update(Audit)
            .where(Audit.id == audit_id, Audit.status == AuditStatus.running, Audit.attempts == attempt)
            .values(progress=fraction, progress_message=message, heartbeat_at=utcnow()),
        )
        if written != 1:
            raise AttemptSuperseded(audit_id)
        if session.scalar(select(Audit.cancel_requested).where(Audit.id == audit_id)):
            raise AuditCancelled(audit_id)


def finish(audit_id: str, attempt: int, status: AuditStatus, *, error: str | None = None) -> None:
    with session_scope() as session:
        session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.status == AuditStatus.running, Audit.attempts == attempt)
            .values(status=status, error=error, finished_at=utcnow(), heartbeat_at=utcnow())
        )


def pipeline_inputs(audit: Audit, output_dir: Path) -> AuditInputs:
    train_id = audit.spec["train_dataset_id"]
    session = object_session(audit)
    assert session is not None, "pipeline_inputs takes an audit loaded by an open session"
    train_dataset = session.get(Dataset, train_id) if train_id else None
    return audit_inputs(audit, train_dataset, get_store(), output_dir, get_settings().device)


def render_html(audit: Audit, store) -> str | None:
    """The HTML report, rendered once from the same report the API serves; the JSON stays complete if this fails."""
    from worker.report_html import render_report_html

    try:
        html = render_report_html(assemble_report(audit))
    except Exception:
        log.exception("audit %s: the HTML report could not be rendered", audit.id)
        return None
    with tempfile.NamedTemporaryFile(
        "w", suffix=".html", dir=store.root / "tmp", delete=False, encoding="utf-8"
    ) as handle:
        handle.write(html)
    return store.add_file(Path(handle.name))


def store_results(audit_id: str, attempt: int, output: AuditOutput) -> None:
    store = get_store()
    with session_scope() as session:
        # get_one: this attempt claimed the row and audits are never deleted, so it exists.
        audit = session.get_one(Audit, audit_id)
        for position, run in enumerate(output.runs):
            result = run.result
            session.add(
                Run(
                    audit_id=audit_id,
                    position=position,
                    label=result.label,
                    method=result.method,
                    scope=result.scope,
                    ratio=result.ratio,
                    mitigation=result.mitigation,
                    weights_sha256=store.add_file(run.weights_path) if run.weights_path is not None else None,
                    result=result.model_dump(mode="json"),
                )
            )
        audit.environment = output.environment
        session.flush()
        session.expire(audit, ["runs"])
        finished_at = utcnow()
        audit.finished_at = finished_at  # the HTML shows the same finish time as the JSON
        audit.report_html_sha256 = render_html(audit, store)
        # Results and the final state land in one transaction: a report is never half-written.
        finished = rows_matched(
            session,
            update(Audit)
            .where(Audit.id == audit_id, Audit.status == AuditStatus.running, Audit.attempts == attempt)
            .values(
                status=AuditStatus.succeeded,
                progress=1.0,
                progress_message="done",
                finished_at=finished_at,
                heartbeat_at=utcnow(),
            ),
        )
        if finished != 1:
            session.rollback()
            log.info(
                "audit %s left 'running' (or was re-queued) while attempt %d ran; its results are discarded",
                audit_id,
                attempt,
            )


@app.task(name=RUN_AUDIT_TASK)
def run_audit(audit_id: str) -> None:
    attempt = claim(audit_id)
    if attempt is None:
        log.info("audit %s is not queued (already claimed or gone); nothing to do", audit_id)
        return
    # torch is imported in the child that runs the task, not in the worker's parent process.
    from worker.engine.errors import EngineError
    from worker.heartbeat import AttemptHeartbeat
    from worker.pipeline.runner import run_audit_pipeline

    settings = get_settings()
    try:
        with (
            AttemptHeartbeat(
                audit_id, attempt, interval_s=settings.heartbeat_interval_s, max_memory_mb=settings.worker_max_memory_mb
            ),
            tempfile.TemporaryDirectory(dir=get_store().root / "tmp") as output_dir,
        ):
            with session_scope() as session:
                inputs = pipeline_inputs(session.get_one(Audit, audit_id), Path(output_dir))
            result = run_audit_pipeline(
                inputs, lambda fraction, message: report_progress(audit_id, attempt, fraction, message)
            )
            # A last ownership check: an attempt the sweeper replaced while it computed stores nothing.
            report_progress(audit_id, attempt, 1.0, "storing results")
            store_results(audit_id, attempt, result)
    except AttemptSuperseded:
        log.warning(
            "audit %s: attempt %d no longer owns the audit (re-queued or ended); its work is dropped", audit_id, attempt
        )
    except AuditCancelled:
        finish(audit_id, attempt, AuditStatus.cancelled)
    except EngineError as exc:
        finish(audit_id, attempt, AuditStatus.failed, error=str(exc))
    except SoftTimeLimitExceeded:
        finish(
            audit_id,
            attempt,
            AuditStatus.failed,
            error=f"the audit exceeded the time limit of {settings.audit_time_limit_s} s",
        )
    except MemoryError:
        finish(
            audit_id,
            attempt,
            AuditStatus.failed,
            error="the worker ran out of memory; use a smaller model, dataset or batch_size",
        )
    except Exception as exc:
        log.exception("audit %s failed", audit_id)
        finish(audit_id, attempt, AuditStatus.failed, error=f"internal error: {type(exc).__name__}: {exc}")
