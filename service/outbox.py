"""The sweeper's part in schedules and webhooks (service/recovery.py calls `sweep_outbox` every sweep):

- fire the due schedules (exactly once per tick: service/schedules.py);
- record the end events of audits that ended where no worker recorded them (a cancel by the API, a sweeper's own
  failure verdict, a worker killed between its commit and its events);
- send again pending deliveries whose attempt is overdue by `webhook_resend_after_s`: their message was lost, or
  their worker died mid-attempt (its lease ran out). The attempt's claim makes a duplicate message harmless."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update

from service import events
from service.db import rows_matched, session_scope
from service.models import DeliveryStatus, WebhookDelivery, utcnow
from service.queue import enqueue_delivery, enqueue_mlflow_log
from service.schedules import fire_due_schedules, send_after_commit
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class OutboxOutcome:
    fired: list[str] = field(default_factory=list)  # audits created by schedules
    announced: list[str] = field(default_factory=list)  # audits whose end events this sweep recorded
    deliveries_resent: list[str] = field(default_factory=list)


def announce_ended_audits(settings: Settings, outcome: OutboxOutcome) -> None:
    with session_scope() as session:
        audit_ids = events.unannounced_audits(session)
    for audit_id in audit_ids:
        try:
            with session_scope() as session:
                end = events.record_audit_end(session, audit_id, settings)
        except Exception:
            # Rolled back, so it is tried again next sweep; the other audits go on.
            log.exception("audit %s: could not record its end events", audit_id)
            continue
        outcome.announced.append(audit_id)
        for delivery_id in end.deliveries:
            send_after_commit(enqueue_delivery, delivery_id)
        if end.claimed_success and settings.mlflow_tracking_uri:
            send_after_commit(enqueue_mlflow_log, audit_id)


def resend_lost_deliveries(settings: Settings, outcome: OutboxOutcome, carried: Callable[[], set[str]]) -> None:
    """`carried()`: the delivery ids that messages in the broker carry; those are waiting, not lost (a busy worker
    has not taken them yet)."""
    now = utcnow()
    overdue = (
        WebhookDelivery.status == DeliveryStatus.pending,
        WebhookDelivery.next_attempt_at < now - timedelta(seconds=settings.webhook_resend_after_s),
    )
    with session_scope() as session:
        lost = session.scalars(select(WebhookDelivery.id).where(*overdue).limit(500)).all()
    waiting = carried() if lost else set()
    for delivery_id in (d for d in lost if d not in waiting):
        # Due now: the claim of whichever message arrives first matches; another sweeper's UPDATE matches nothing.
        with session_scope() as session:
            if (
                rows_matched(
                    session,
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == delivery_id, *overdue)
                    .values(next_attempt_at=now)
                    # The loaded row holds SQLite's naive datetimes: no in-Python evaluation of the criteria.
                    .execution_options(synchronize_session=False),
                )
                != 1
            ):
                continue
        log.warning("delivery %s: pending past its attempt time; sent again", delivery_id)
        send_after_commit(enqueue_delivery, delivery_id)
        outcome.deliveries_resent.append(delivery_id)


def sweep_outbox(settings: Settings, carried: Callable[[], set[str]]) -> OutboxOutcome:
    outcome = OutboxOutcome()
    outcome.fired = fire_due_schedules(settings)
    announce_ended_audits(settings, outcome)
    resend_lost_deliveries(settings, outcome, carried)
    return outcome
