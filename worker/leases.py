"""Who owns an audit or a run now: the claims, checkpoints and last writes of the worker's two tasks. Every write
is a conditional UPDATE matching the attempt that claimed the row, so a duplicate delivery claims nothing and a
worker that comes back after the sweeper re-queued its work writes nothing. Changes to a run of a running audit
lock the audit row first (service/runs.py)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Update, select, update

from service.db import rows_matched, session_scope
from service.models import Audit, AuditStatus, Run, RunStatus, utcnow
from service.runs import end_audit, lock_running_audit, settle_cancellation


class AuditCancelled(Exception):
    """Raised at a checkpoint when the audit was asked to stop (or, for a run, ended meanwhile)."""


class AttemptSuperseded(Exception):
    """Raised at a checkpoint when this attempt no longer owns its row (re-queued by the sweeper after its
    heartbeat went stale, or ended): its work is abandoned, never written."""


@dataclass(frozen=True)
class AuditLease:
    """The audit task's claim, from queued → running until the dense baseline is stored and the runs queued."""

    audit_id: str
    attempt: int

    @property
    def subject(self) -> str:
        return "the audit"

    def owned(self) -> Update:
        return update(Audit).where(
            Audit.id == self.audit_id,
            Audit.status == AuditStatus.running,
            Audit.attempts == self.attempt,
            Audit.runs_queued_at.is_(None),
        )

    def beat(self) -> bool:
        """False once the row is no longer this attempt's (ended, re-queued after a stall, or its runs queued)."""
        with session_scope() as session:
            return rows_matched(session, self.owned().values(heartbeat_at=utcnow())) == 1

    def checkpoint(self, fraction: float, message: str) -> None:
        """Progress, heartbeat and the cancellation check."""
        with session_scope() as session:
            written = rows_matched(
                session, self.owned().values(progress=fraction, progress_message=message, heartbeat_at=utcnow())
            )
            if written != 1:
                raise AttemptSuperseded(self.audit_id)
            if session.scalar(select(Audit.cancel_requested).where(Audit.id == self.audit_id)):
                raise AuditCancelled(self.audit_id)

    def _finish(self, status: AuditStatus, error: str | None) -> bool:
        with session_scope() as session:
            values = dict(status=status, error=error, finished_at=utcnow(), heartbeat_at=utcnow())
            return rows_matched(session, self.owned().values(**values)) == 1

    def stop(self) -> bool:
        return self._finish(AuditStatus.cancelled, None)

    def fail(self, error: str) -> bool:
        return self._finish(AuditStatus.failed, error)


def claim_audit(audit_id: str) -> AuditLease | None:
    """queued → running; None when another delivery got there first (or the audit ended)."""
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
        attempt = session.scalar(select(Audit.attempts).where(Audit.id == audit_id))
    assert attempt is not None, "the claimed row exists"
    return AuditLease(audit_id, attempt)


@dataclass(frozen=True)
class RunLease:
    """A run task's claim of one run of a running audit, from queued → running until it ends."""

    run_id: str
    attempt: int
    audit_id: str
    audit_attempt: int
    position: int
    label: str

    @property
    def subject(self) -> str:
        return "the run"

    def owned(self) -> Update:
        return update(Run).where(Run.id == self.run_id, Run.status == RunStatus.running, Run.attempts == self.attempt)

    def beat(self) -> bool:
        with session_scope() as session:
            return rows_matched(session, self.owned().values(heartbeat_at=utcnow())) == 1

    def lock_audit(self, session) -> bool:
        """The audit's lock, while it runs this attempt and was not asked to stop."""
        return lock_running_audit(
            session, self.audit_id, Audit.attempts == self.audit_attempt, Audit.cancel_requested.is_(False)
        )

    def checkpoint(self, message: str) -> None:
        """Heartbeat, the audit's progress message, and the cancellation check (between epochs)."""
        with session_scope() as session:
            if not self.lock_audit(session):
                raise AuditCancelled(self.audit_id)
            session.execute(
                update(Audit).where(Audit.id == self.audit_id).values(progress_message=f"{self.label}: {message}")
            )
            if rows_matched(session, self.owned().values(heartbeat_at=utcnow())) != 1:
                raise AttemptSuperseded(self.run_id)

    def stop(self) -> bool:
        """This run stops, cancelled; True when that ended its (cancelled) audit."""
        with session_scope() as session:
            cancelling = lock_running_audit(session, self.audit_id, Audit.cancel_requested.is_(True))
            stopped = rows_matched(
                session,
                self.owned().values(
                    status=RunStatus.cancelled, finished_at=utcnow(), error="stopped: its audit was cancelled or ended"
                ),
            )
            return bool(cancelling and stopped and settle_cancellation(session, self.audit_id))

    def fail(self, error: str) -> bool:
        """This run fails, and its audit with it (queued runs are then never computed); True when the audit ended."""
        with session_scope() as session:
            locked = lock_running_audit(session, self.audit_id, Audit.attempts == self.audit_attempt)
            failed = rows_matched(
                session, self.owned().values(status=RunStatus.failed, error=error, finished_at=utcnow())
            )
            return bool(
                locked
                and failed
                and end_audit(
                    session, self.audit_id, AuditStatus.failed, error=f"run {self.label}: {error}", message="failed"
                )
            )


def claim_run(run_id: str, worker: str) -> RunLease | None:
    """queued → running, while its audit runs (its runs queued, not asked to stop) and the run it starts from has
    succeeded; None otherwise (a duplicate delivery, a cancelled or ended audit, a dependent sent too early: it is
    sent again when its unmitigated run succeeds)."""
    with session_scope() as session:
        row = session.execute(select(Run.audit_id, Run.starts_from).where(Run.id == run_id)).one_or_none()
        if row is None:
            return None
        audit_id, starts_from = row
        if not lock_running_audit(
            session, audit_id, Audit.cancel_requested.is_(False), Audit.runs_queued_at.is_not(None)
        ):
            return None
        if starts_from is not None:
            prerequisite = select(Run.status).where(Run.audit_id == audit_id, Run.position == starts_from)
            if session.scalar(prerequisite) != RunStatus.succeeded:
                return None
        claimed = rows_matched(
            session,
            update(Run)
            .where(Run.id == run_id, Run.status == RunStatus.queued)
            .values(
                status=RunStatus.running,
                attempts=Run.attempts + 1,
                worker=worker,
                started_at=utcnow(),
                heartbeat_at=utcnow(),
                error=None,
            ),
        )
        if claimed != 1:
            return None
        attempt, position, label = session.execute(
            select(Run.attempts, Run.position, Run.label).where(Run.id == run_id)
        ).one()
        audit_attempt = session.scalar(select(Audit.attempts).where(Audit.id == audit_id))
    assert audit_attempt is not None, "the locked audit exists"
    return RunLease(run_id, attempt, audit_id, audit_attempt, position, label)
