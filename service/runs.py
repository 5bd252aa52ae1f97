"""The state changes of an audit's runs that the API (cancel), the sweeper and the workers share. Pure database, no
torch.

Every transaction that changes a run of a running audit starts with `lock_running_audit`: an UPDATE of the audit
row, which takes that row's lock on PostgreSQL and the database's write lock on SQLite. Transactions on one
audit's runs are so serialized, and each reads what the one before it committed: of two runs finishing at the
same moment exactly the later sees that all runs are done; a cancel and a claim, or a sweeper and a worker,
never act on a snapshot from before the other."""

from __future__ import annotations

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from service.db import rows_matched
from service.models import Audit, AuditStatus, Run, RunStatus, utcnow


def lock_running_audit(session: Session, audit_id: str, *conditions: ColumnElement[bool]) -> bool:
    """Lock the audit row if it is running (and matches `conditions`); False, locking nothing, otherwise. Call it
    first in the transaction."""
    locked = update(Audit).where(Audit.id == audit_id, Audit.status == AuditStatus.running, *conditions)
    return rows_matched(session, locked.values(updated_at=utcnow())) == 1


def stop_queued_runs(session: Session, audit_id: str, reason: str) -> None:
    """Queued runs are never computed once their audit is cancelled or failed: their claim needs them queued."""
    session.execute(
        update(Run)
        .where(Run.audit_id == audit_id, Run.status == RunStatus.queued)
        .values(status=RunStatus.cancelled, finished_at=utcnow(), error=reason)
    )


def run_counts(session: Session, audit_id: str) -> dict[RunStatus, int]:
    rows = session.execute(select(Run.status, func.count()).where(Run.audit_id == audit_id).group_by(Run.status)).all()
    return {status: count for status, count in rows}


def end_audit(session: Session, audit_id: str, status: AuditStatus, *, error: str | None, message: str) -> bool:
    """A running audit ends `status` (failed or cancelled); its queued runs are stopped. Running runs stop at their
    next checkpoint, where they find the audit ended. The caller holds the audit's lock."""
    ended = rows_matched(
        session,
        update(Audit)
        .where(Audit.id == audit_id, Audit.status == AuditStatus.running)
        .values(status=status, error=error, finished_at=utcnow(), progress_message=message),
    )
    if ended:
        stop_queued_runs(session, audit_id, f"not computed: the audit {status.value}")
    return ended == 1


def settle_cancellation(session: Session, audit_id: str) -> bool:
    """A running audit asked to stop, whose runs are queued: its queued runs are stopped, and once none runs any
    more it ends `cancelled`. True when it ended now. The caller holds the audit's lock."""
    stop_queued_runs(session, audit_id, "not computed: the audit was cancelled")
    if run_counts(session, audit_id).get(RunStatus.running):
        return False
    return end_audit(session, audit_id, AuditStatus.cancelled, error=None, message="cancelled")
