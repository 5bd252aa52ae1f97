"""What the tasks write: the dense run and the queued runs once the baseline is stored (the fan-out), each run's
result, and the report once the last run has succeeded (the assembly).

The run that finishes last assembles the report, in the same transaction that stores its own result: it holds
the audit's lock (service/runs.py), so of two runs finishing at once exactly the later sees every run done, and
a duplicate delivery never gets this far (its claim finds the run no longer queued). No separate assemble task:
there is no message to lose between the last result and the report, and no state in which every run has
succeeded but the audit is still running."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from results.runs import RunResult
from service.audits import assemble_report
from service.changes import detect_changes
from service.db import rows_matched, session_scope
from service.models import Audit, AuditStatus, Run, RunStatus, utcnow
from service.runs import run_counts
from service.storage import BlobStore, get_store
from service.temp_names import temp_prefix
from worker.inputs import RunPlan
from worker.leases import AttemptSuperseded, AuditCancelled, AuditLease, RunLease

log = logging.getLogger(__name__)


def render_html(audit: Audit, store: BlobStore) -> str | None:
    """The HTML report, rendered once from the same report the API serves; the JSON stays complete if this fails."""
    from worker.report_html import render_report_html

    try:
        html = render_report_html(assemble_report(audit))
    except Exception:
        log.exception("audit %s: the HTML report could not be rendered", audit.id)
        return None
    with tempfile.NamedTemporaryFile(
        "w", suffix=".html", prefix=temp_prefix("report"), dir=store.root / "tmp", delete=False, encoding="utf-8"
    ) as handle:
        handle.write(html)
    return store.add_file(Path(handle.name))


def scheduled_changes(session: Session, audit: Audit) -> dict | None:
    """What moved since the schedule's previous audit; a failure to compare is logged, never fails the audit."""
    try:
        return detect_changes(session, audit)
    except Exception:
        log.exception("audit %s: could not compare it with its schedule's previous audit", audit.id)
        return None


def _why_not_owned(session: Session, audit_id: str) -> Exception:
    cancel_requested = session.scalar(
        select(Audit.cancel_requested).where(Audit.id == audit_id, Audit.status == AuditStatus.running)
    )
    return AuditCancelled(audit_id) if cancel_requested else AttemptSuperseded(audit_id)


def queue_runs(
    lease: AuditLease, plans: list[RunPlan], dense: RunResult, worker: str, started_at: datetime
) -> list[tuple[str, int]]:
    """The fan-out, in one transaction of the attempt that owns the audit: the dense run (position 0) stored, one
    queued run per plan, and the audit marked as having its runs queued (from then on the sweeper watches each
    run's heartbeat, not the audit's). Returns the runs that can start now (the others wait for the run they
    start from), with their positions."""
    total = len(plans) + 1
    with session_scope() as session:
        fanned_out = rows_matched(
            session,
            lease.owned()
            .where(Audit.cancel_requested.is_(False))
            .values(
                runs_queued_at=utcnow(),
                heartbeat_at=utcnow(),
                progress=1 / total,
                progress_message=f"dense baseline stored; {len(plans)} runs queued",
            ),
        )
        if fanned_out != 1:
            raise _why_not_owned(session, lease.audit_id)
        session.add(
            Run(
                audit_id=lease.audit_id,
                position=0,
                label=dense.label,
                method=dense.method,
                scope=dense.scope,
                ratio=dense.ratio,
                mitigation=dense.mitigation,
                status=RunStatus.succeeded,
                attempts=1,
                worker=worker,
                started_at=started_at,
                finished_at=utcnow(),
                result=dense.model_dump(mode="json"),
            )
        )
        runs = [
            Run(
                audit_id=lease.audit_id,
                position=plan.position,
                label=plan.label,
                method=plan.method.method,
                scope=plan.method.scope,
                ratio=plan.ratio,
                mitigation=plan.mitigation.name if plan.mitigation else "none",
                starts_from=plan.starts_from,
                status=RunStatus.queued,
                attempts=0,
            )
            for plan in plans
        ]
        session.add_all(runs)
        session.flush()
        return [(run.id, run.position) for run in runs if run.starts_from is None]


@dataclass(frozen=True)
class StoredRun:
    dependents: list[tuple[str, int]]  # queued runs (id, position) that start from this one: to enqueue now
    assembled: bool  # this run was the last, and the report is written


def store_run(lease: RunLease, result: RunResult, weights_path: Path, environment: dict) -> StoredRun:
    """The run's weights and result, with its audit's progress, in one transaction matching both attempts; the
    report too when this run is the last."""
    store = get_store()
    # Content-addressed: a copy stored by an attempt that then loses its row is harmless.
    weights_sha256 = store.add_file(weights_path)
    onnx_path = weights_path.with_suffix(".onnx")  # written for an imported ONNX model's runs
    onnx_sha256 = store.add_file(onnx_path) if onnx_path.is_file() else None
    with session_scope() as session:
        if not lease.lock_audit(session):
            raise AuditCancelled(lease.audit_id)
        stored = rows_matched(
            session,
            lease.owned().values(
                status=RunStatus.succeeded,
                result=result.model_dump(mode="json"),
                weights_sha256=weights_sha256,
                onnx_sha256=onnx_sha256,
                finished_at=utcnow(),
                heartbeat_at=utcnow(),
            ),
        )
        if stored != 1:
            raise AttemptSuperseded(lease.run_id)
        counts = run_counts(session, lease.audit_id)
        finished, total = counts.get(RunStatus.succeeded, 0), sum(counts.values())
        dependents = session.execute(
            select(Run.id, Run.position).where(
                Run.audit_id == lease.audit_id, Run.starts_from == lease.position, Run.status == RunStatus.queued
            )
        ).all()
        if finished < total:
            session.execute(
                update(Audit)
                .where(Audit.id == lease.audit_id)
                .values(progress=finished / total, progress_message=f"{finished} of {total} runs finished")
            )
            return StoredRun([(run_id, position) for run_id, position in dependents], assembled=False)
        assemble(session, lease, environment, store)
    return StoredRun([], assembled=True)


def assemble(session: Session, lease: RunLease, environment: dict, store: BlobStore) -> None:
    """The report of an audit whose runs have all succeeded: HTML, environment, succeeded. The caller holds the
    audit's lock."""
    audit = session.get_one(Audit, lease.audit_id)
    audit.environment = environment
    finished_at = utcnow()
    audit.finished_at = finished_at  # the HTML shows the same finish time as the JSON
    audit.changes = scheduled_changes(session, audit)
    audit.report_html_sha256 = render_html(audit, store)
    finished = rows_matched(
        session,
        update(Audit)
        .where(Audit.id == lease.audit_id, Audit.status == AuditStatus.running, Audit.attempts == lease.audit_attempt)
        .values(
            status=AuditStatus.succeeded,
            progress=1.0,
            progress_message="done",
            finished_at=finished_at,
            heartbeat_at=utcnow(),
        ),
    )
    assert finished == 1, "the caller holds the running audit's lock"
