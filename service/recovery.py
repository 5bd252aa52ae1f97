"""The sweeper: recovers audits and runs that a crash left behind, from the database (the source of truth).

- `running` audits still measuring their dense baseline (no runs queued yet) whose heartbeat went stale lost their
  worker (kill -9, OOM killer, host crash, a hard time limit): back to `queued` and enqueued again, until
  `max_attempts`; then `failed` with the reason. Once its runs are queued an audit has no worker of its own (its
  heartbeat is not watched); each run is.
- `running` runs whose heartbeat went stale: that run alone back to `queued` and sent again, until `max_attempts`
  (per run); then the run and its audit fail with the reason. A stale run of an audit asked to stop is cancelled.
- `queued` audits, and queued runs that can start, with no message in the broker (Redis restarted without
  persistence, a process died between commit and enqueue, the broker was down) are sent again.
- Work directories (stored baselines, masks) of audits that ended are removed: crash leftovers; so are temporary
  files of dead processes and dataset directories without a row (service/janitor.py).

Every state change is a conditional UPDATE (a run's under its audit's lock, service/runs.py), so several sweepers
can run at once; a duplicate message is harmless because the worker's claims are conditional UPDATEs too. Pure
database + Celery client, no torch."""

from __future__ import annotations

import base64
import json
import logging
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, create_engine, exists, or_, select, text, update
from sqlalchemy.orm import aliased

from service.db import rows_matched, session_scope
from service.janitor import remove_leftovers
from service.models import Audit, AuditStatus, Run, RunStatus, utcnow
from service.outbox import OutboxOutcome, sweep_outbox
from service.queue import (
    COMPUTE_RUN_TASK,
    DELIVER_WEBHOOK_TASK,
    RUN_AUDIT_TASK,
    enqueue_audit,
    enqueue_run,
    queue_names,
)
from service.retention import delete_expired_audits
from service.runs import end_audit, lock_running_audit, settle_cancellation
from service.settings import Settings, get_settings
from service.storage import get_store

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    requeued: list[str] = field(default_factory=list)  # stale running → queued (and enqueued)
    failed: list[str] = field(default_factory=list)  # stale running at the attempt cap → failed
    cancelled: list[str] = field(default_factory=list)  # stale running that had been asked to stop
    reenqueued: list[str] = field(default_factory=list)  # queued with no broker message → enqueued again
    runs_requeued: list[str] = field(default_factory=list)  # stale running run → queued (and sent)
    runs_failed: list[str] = field(default_factory=list)  # stale running run at the attempt cap → failed, audit too
    runs_cancelled: list[str] = field(default_factory=list)  # stale running run of an audit asked to stop, or ended
    runs_resent: list[str] = field(default_factory=list)  # queued run with no broker message → sent again
    work_removed: list[str] = field(default_factory=list)  # work directories of ended audits
    leftovers_removed: list[str] = field(default_factory=list)  # crash leftovers in the blob store (janitor)
    expired: list[str] = field(default_factory=list)  # audits past audit_retention_days, deleted
    outbox: OutboxOutcome | None = None  # schedules fired, end events recorded, deliveries sent again


def vanished_reason(attempts: int, subject: str = "audit") -> str:
    return (
        f"the worker running this {subject} vanished {attempts} time{'s' if attempts != 1 else ''} (its process was "
        "killed: out of memory, kill -9, a hard time limit or a host crash); giving up after "
        f"{attempts} attempt{'s' if attempts != 1 else ''}. A model or dataset too large for the workers' "
        "memory does this; try a smaller one or a smaller batch_size"
    )


def recover_stale_audits(settings: Settings, outcome: SweepOutcome) -> None:
    """Audits whose worker vanished while measuring the dense baseline (before their runs were queued)."""
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    stale_heartbeat = or_(Audit.heartbeat_at < cutoff, Audit.heartbeat_at.is_(None))
    measuring = (Audit.status == AuditStatus.running, Audit.runs_queued_at.is_(None))
    with session_scope() as session:
        stale = session.execute(
            select(Audit.id, Audit.attempts, Audit.cancel_requested).where(*measuring, stale_heartbeat)
        ).all()
    for audit_id, attempts, cancel_requested in stale:
        # Matching attempts and the stale heartbeat again: a beat or another sweeper in between wins.
        row = update(Audit).where(Audit.id == audit_id, *measuring, Audit.attempts == attempts, stale_heartbeat)
        values: dict[str, Any]  # keyword arguments of UPDATE ... VALUES
        if cancel_requested:
            values, bucket = (
                dict(
                    status=AuditStatus.cancelled,
                    finished_at=utcnow(),
                    progress_message="cancelled; its worker had vanished",
                ),
                outcome.cancelled,
            )
        elif attempts >= settings.max_attempts:
            values, bucket = (
                dict(status=AuditStatus.failed, finished_at=utcnow(), error=vanished_reason(attempts)),
                outcome.failed,
            )
        else:
            values, bucket = (
                dict(
                    status=AuditStatus.queued,
                    heartbeat_at=None,
                    progress=0.0,
                    progress_message=f"re-queued: the worker of attempt {attempts} stopped sending heartbeats",
                ),
                outcome.requeued,
            )
        with session_scope() as session:
            if rows_matched(session, row.values(**values)) != 1:
                continue
        bucket.append(audit_id)
        log.warning(
            "audit %s: attempt %d sent no heartbeat for %gs, its worker is gone: %s",
            audit_id,
            attempts,
            settings.heartbeat_timeout_s,
            values["status"].value,
        )
        if bucket is outcome.requeued:
            send(RUN_AUDIT_TASK, audit_id)


def send(task: str, row_id: str) -> None:
    try:
        (enqueue_audit if task == RUN_AUDIT_TASK else enqueue_run)(row_id)
    except Exception:
        # It stays queued; the next sweep finds it without a broker message and sends it then.
        log.exception("%s %s: could not enqueue; will retry on the next sweep", task, row_id)


def recover_stale_runs(settings: Settings, outcome: SweepOutcome) -> None:
    """Runs whose worker vanished: each alone back to queued (attempts per run), or failed at the cap."""
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    stale_heartbeat = or_(Run.heartbeat_at < cutoff, Run.heartbeat_at.is_(None))
    with session_scope() as session:
        stale = session.execute(
            select(Run.id, Run.audit_id, Run.attempts, Run.label).where(
                Run.status == RunStatus.running, stale_heartbeat
            )
        ).all()
    for run_id, audit_id, attempts, label in stale:
        with session_scope() as session:
            audit_running = lock_running_audit(session, audit_id)
            cancel_requested = session.scalar(select(Audit.cancel_requested).where(Audit.id == audit_id))
            row = update(Run).where(
                Run.id == run_id, Run.status == RunStatus.running, Run.attempts == attempts, stale_heartbeat
            )
            values: dict[str, Any]
            if not audit_running or cancel_requested:
                values = dict(status=RunStatus.cancelled, finished_at=utcnow(), error="stopped: its worker vanished")
                bucket = outcome.runs_cancelled
            elif attempts >= settings.max_attempts:
                values = dict(status=RunStatus.failed, finished_at=utcnow(), error=vanished_reason(attempts, "run"))
                bucket = outcome.runs_failed
            else:
                values = dict(status=RunStatus.queued, heartbeat_at=None, worker=None)
                bucket = outcome.runs_requeued
            if rows_matched(session, row.values(**values)) != 1:
                continue
            if bucket is outcome.runs_failed:
                end_audit(
                    session, audit_id, AuditStatus.failed, error=f"run {label}: {values['error']}", message="failed"
                )
            elif bucket is outcome.runs_cancelled and audit_running:
                settle_cancellation(session, audit_id)
        bucket.append(run_id)
        log.warning(
            "run %s of audit %s: attempt %d sent no heartbeat for %gs, its worker is gone: %s",
            run_id,
            audit_id,
            attempts,
            settings.heartbeat_timeout_s,
            values["status"].value,
        )
        if bucket is outcome.runs_requeued:
            send(COMPUTE_RUN_TASK, run_id)


def ids_in(raw_messages: Iterable[bytes | str], task: str) -> set[str]:
    """The row ids (audit or run) that kombu messages of `task` carry (JSON envelopes, body base64-encoded by
    default)."""
    ids = set()
    for raw in raw_messages:
        try:
            envelope = json.loads(raw)
            if isinstance(envelope, list):  # Redis's unacked hash stores [message, exchange, routing_key]
                envelope = envelope[0]
            if envelope.get("headers", {}).get("task") != task:
                continue
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]  # task protocol 2: [args, kwargs, embed]
            ids.add(str(args[0]))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            log.debug("skipping a broker message that is not a pruneaudit task")
    return ids


def live_messages(settings: Settings) -> list[bytes | str] | None:
    """Every message in the broker's queue, waiting or delivered-but-unacked; None when this transport cannot be
    inspected (then every old queued row is sent again: duplicates are no-ops)."""
    broker_url = settings.resolved_broker_url()
    if broker_url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(broker_url, socket_timeout=10)
        prefix = settings.broker_key_prefix
        try:
            # Waiting lists first (kombu's priority sub-queues included), then the unacked hash: a message
            # popped in between is then seen in the second place rather than missed in both.
            waiting = [
                raw
                for queue in queue_names(settings)
                for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169")
                for raw in client.lrange(f"{prefix}{queue}{suffix}", 0, -1)
            ]
            unacked = client.hvals(f"{prefix}unacked")
        finally:
            client.close()
        return [*waiting, *unacked]
    if broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport: delivered messages are kept with visible = false.
        engine = create_engine(broker_url.removeprefix("sqla+"))
        try:
            with engine.connect() as connection:
                if not engine.dialect.has_table(connection, "kombu_message"):
                    return []
                payloads = connection.execute(
                    text(
                        "SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
                        "WHERE q.name IN :queues AND m.visible"
                    ).bindparams(bindparam("queues", expanding=True)),
                    {"queues": queue_names(settings)},
                ).scalars()
                return list(payloads)
        finally:
            engine.dispose()
    return None


def resend_lost(task: str, candidates: list[str], claim, live: list | None) -> list[str]:
    """Send again each candidate row that has no message of `task` in the broker; `claim(row_id)` is the conditional
    UPDATE that makes one sweeper, not several, send it."""
    carried = ids_in(live, task) if live is not None else set()
    resent = []
    for row_id in candidates:
        if row_id in carried:
            continue
        with session_scope() as session:
            if rows_matched(session, claim(row_id)) != 1:
                continue
        log.warning("%s %s: queued with no broker message; enqueued again", task, row_id)
        send(task, row_id)
        resent.append(row_id)
    return resent


def recover_lost_messages(settings: Settings, outcome: SweepOutcome) -> None:
    """Queued audits, and queued runs that can start, that waited past `requeue_queued_after_s` with no message."""
    cutoff = utcnow() - timedelta(seconds=settings.requeue_queued_after_s)
    # updated_at is when the row was created or last changed (every UPDATE bumps it).
    old_audit = (Audit.status == AuditStatus.queued, Audit.updated_at < cutoff)
    prerequisite = aliased(Run)
    can_start = or_(
        Run.starts_from.is_(None),
        exists().where(
            prerequisite.audit_id == Run.audit_id,
            prerequisite.position == Run.starts_from,
            prerequisite.status == RunStatus.succeeded,
        ),
    )
    running_audit = exists().where(
        Audit.id == Run.audit_id, Audit.status == AuditStatus.running, Audit.cancel_requested.is_(False)
    )
    old_run = (Run.status == RunStatus.queued, Run.updated_at < cutoff, running_audit, can_start)
    with session_scope() as session:
        audits = session.scalars(select(Audit.id).where(*old_audit).order_by(Audit.created_at)).all()
        runs = session.scalars(select(Run.id).where(*old_run).order_by(Run.position)).all()
    if not audits and not runs:
        return
    live = live_messages(settings)
    # Bumping updated_at claims a re-send: another sweeper's UPDATE then matches nothing.
    outcome.reenqueued = resend_lost(
        RUN_AUDIT_TASK,
        list(audits),
        lambda audit_id: (
            update(Audit)
            .where(Audit.id == audit_id, *old_audit)
            .values(progress_message="re-enqueued: its broker message was lost")
        ),
        live,
    )
    outcome.runs_resent = resend_lost(
        COMPUTE_RUN_TASK,
        list(runs),
        lambda run_id: update(Run).where(Run.id == run_id, *old_run).values(updated_at=utcnow()),
        live,
    )


def remove_ended_work(outcome: SweepOutcome) -> None:
    """Work directories whose audit ended (or is gone): what a crash between an audit's end and its cleanup left."""
    store = get_store()
    audit_ids = store.work_audit_ids()
    if not audit_ids:
        return
    with session_scope() as session:
        active = set(
            session.scalars(
                select(Audit.id).where(
                    Audit.id.in_(audit_ids), Audit.status.in_([AuditStatus.queued, AuditStatus.running])
                )
            )
        )
    for audit_id in audit_ids:
        if audit_id not in active:
            store.remove_work(audit_id)
            outcome.work_removed.append(audit_id)


def sweep(settings: Settings | None = None) -> SweepOutcome:
    settings = settings or get_settings()
    outcome = SweepOutcome()
    recover_stale_audits(settings, outcome)
    recover_stale_runs(settings, outcome)
    recover_lost_messages(settings, outcome)
    remove_ended_work(outcome)
    outcome.leftovers_removed = remove_leftovers(get_store(), settings.leftover_age_s)
    outcome.expired = delete_expired_audits(settings)
    outcome.outbox = sweep_outbox(settings, lambda: ids_in(live_messages(settings) or [], DELIVER_WEBHOOK_TASK))
    return outcome


def run_sweeper(stop: threading.Event | None = None) -> None:
    """Sweep every `sweep_interval_s` until SIGTERM/SIGINT; a sweep that fails (database or broker away) is
    logged and the next one tries again."""
    settings = get_settings()
    stop = stop or threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info(
        "sweeper: every %gs; heartbeat timeout %gs, max attempts %d, lost-message check after %gs",
        settings.sweep_interval_s,
        settings.heartbeat_timeout_s,
        settings.max_attempts,
        settings.requeue_queued_after_s,
    )
    while not stop.is_set():
        try:
            sweep(settings)
        except Exception:
            log.exception("sweep failed; retrying in %gs", settings.sweep_interval_s)
        stop.wait(settings.sweep_interval_s)
