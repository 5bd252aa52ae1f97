"""The sweeper: recovers audits that a crash left behind, from the database (the source of truth).

- `running` audits whose heartbeat went stale lost their worker (kill -9, OOM killer, host crash, a hard time
  limit): back to `queued` and enqueued again, until `max_attempts`; then `failed` with the reason.
- `queued` audits with no message in the broker (Redis restarted without persistence, the API died between
  commit and enqueue, the broker was down at submission) are enqueued again.

Every state change is a conditional UPDATE, so several sweepers can run at once; a duplicate message is
harmless because the worker's claim is a conditional UPDATE too. Pure database + Celery client, no torch."""

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

from sqlalchemy import create_engine, or_, select, text, update

from service.db import rows_matched, session_scope
from service.models import Audit, AuditStatus, utcnow
from service.queue import RUN_AUDIT_TASK, enqueue_audit
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    requeued: list[str] = field(default_factory=list)  # stale running → queued (and enqueued)
    failed: list[str] = field(default_factory=list)  # stale running at the attempt cap → failed
    cancelled: list[str] = field(default_factory=list)  # stale running that had been asked to stop
    reenqueued: list[str] = field(default_factory=list)  # queued with no broker message → enqueued again


def vanished_reason(attempts: int) -> str:
    return (
        f"the worker running this audit vanished {attempts} time{'s' if attempts != 1 else ''} (its process was "
        "killed: out of memory, kill -9, a hard time limit or a host crash); giving up after "
        f"{attempts} attempt{'s' if attempts != 1 else ''}. A model or dataset too large for the workers' "
        "memory does this; try a smaller one or a smaller batch_size"
    )


def recover_stale_running(settings: Settings) -> SweepOutcome:
    outcome = SweepOutcome()
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    stale_heartbeat = or_(Audit.heartbeat_at < cutoff, Audit.heartbeat_at.is_(None))
    with session_scope() as session:
        stale = session.execute(
            select(Audit.id, Audit.attempts, Audit.cancel_requested).where(
                Audit.status == AuditStatus.running, stale_heartbeat
            )
        ).all()
    for audit_id, attempts, cancel_requested in stale:
        # Matching attempts and the stale heartbeat again: a beat or another sweeper in between wins.
        row = update(Audit).where(
            Audit.id == audit_id, Audit.status == AuditStatus.running, Audit.attempts == attempts, stale_heartbeat
        )
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
            send(audit_id)
    return outcome


def send(audit_id: str) -> None:
    try:
        enqueue_audit(audit_id)
    except Exception:
        # It stays queued; the next sweep finds it without a broker message and enqueues it then.
        log.exception("audit %s: could not enqueue; will retry on the next sweep", audit_id)


def audit_ids_in(raw_messages: Iterable[bytes | str]) -> set[str]:
    """The audit ids carried by kombu messages (JSON envelopes, body base64-encoded by default)."""
    ids = set()
    for raw in raw_messages:
        try:
            envelope = json.loads(raw)
            if isinstance(envelope, list):  # Redis's unacked hash stores [message, exchange, routing_key]
                envelope = envelope[0]
            if envelope.get("headers", {}).get("task") != RUN_AUDIT_TASK:
                continue
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]  # task protocol 2: [args, kwargs, embed]
            ids.add(str(args[0]))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            log.debug("skipping a broker message that is not a pruneaudit task")
    return ids


def live_audit_ids(settings: Settings) -> set[str] | None:
    """Audit ids with a message in the broker, waiting or delivered-but-unacked; None when this transport
    cannot be inspected (then every old queued audit is enqueued again: duplicates are no-ops)."""
    broker_url = settings.resolved_broker_url()
    if broker_url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(broker_url, socket_timeout=10)
        prefix, queue = settings.broker_key_prefix, settings.queue_name
        try:
            # Waiting lists first (kombu's priority sub-queues included), then the unacked hash: a message
            # popped in between is then seen in the second place rather than missed in both.
            waiting = [
                raw
                for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169")
                for raw in client.lrange(f"{prefix}{queue}{suffix}", 0, -1)
            ]
            unacked = client.hvals(f"{prefix}unacked")
        finally:
            client.close()
        return audit_ids_in(waiting) | audit_ids_in(unacked)
    if broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport: delivered messages are kept with visible = false.
        engine = create_engine(broker_url.removeprefix("sqla+"))
        try:
            with engine.connect() as connection:
                if not engine.dialect.has_table(connection, "kombu_message"):
                    return set()
                payloads = connection.execute(
                    text(
                        "SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
                        "WHERE q.name = :queue AND m.visible"
                    ),
                    {"queue": settings.queue_name},
                ).scalars()
                return audit_ids_in(payloads)
        finally:
            engine.dispose()
    return None


def recover_lost_messages(settings: Settings) -> list[str]:
    cutoff = utcnow() - timedelta(seconds=settings.requeue_queued_after_s)
    # updated_at is when the audit was created or last re-queued (every UPDATE bumps it).
    old_and_queued = (Audit.status == AuditStatus.queued, Audit.updated_at < cutoff)
    with session_scope() as session:
        candidates = session.scalars(select(Audit.id).where(*old_and_queued).order_by(Audit.created_at)).all()
    if not candidates:
        return []
    live = live_audit_ids(settings)
    reenqueued = []
    for audit_id in candidates:
        if live is not None and audit_id in live:
            continue
        # Bumping updated_at claims this re-send: another sweeper's UPDATE then matches nothing.
        with session_scope() as session:
            claimed = rows_matched(
                session,
                update(Audit)
                .where(Audit.id == audit_id, *old_and_queued)
                .values(progress_message="re-enqueued: its broker message was lost"),
            )
            if claimed != 1:
                continue
        log.warning("audit %s: queued with no broker message; enqueued again", audit_id)
        send(audit_id)
        reenqueued.append(audit_id)
    return reenqueued


def sweep(settings: Settings | None = None) -> SweepOutcome:
    settings = settings or get_settings()
    outcome = recover_stale_running(settings)
    outcome.reenqueued = recover_lost_messages(settings)
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
