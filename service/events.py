"""Events for webhooks: each becomes one delivery row per subscribed webhook of the tenant, in the transaction of
the change it announces (or, for an audit's end, in the one that claims its `events_recorded_at`); the caller
enqueues the deliveries after commit. The payload carries the tenant, ids, the verdict summary and report links:
never a key or a secret."""

from __future__ import annotations

import logging
from typing import NamedTuple

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload

from service.audits import assemble_report
from service.db import rows_matched
from service.models import Audit, AuditStatus, Schedule, ScheduleFiring, Tenant, Webhook, WebhookDelivery, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

EVENTS = ("audit.succeeded", "audit.failed", "audit.cancelled", "audit.verdict_changed", "schedule.fired")
TEST_EVENT = "webhook.test"
ENDED = (AuditStatus.succeeded, AuditStatus.failed, AuditStatus.cancelled)


def envelope(session: Session, tenant_id: str, event: str, data: dict) -> dict:
    """Standard Webhooks' recommended body: type, timestamp, data."""
    tenant = session.get_one(Tenant, tenant_id)
    return {
        "type": event,
        "timestamp": utcnow().isoformat(),
        "data": {"tenant": {"id": tenant_id, "name": tenant.name}, **data},
    }


def record(session: Session, tenant_id: str, event: str, data: dict, only: Webhook | None = None) -> list[str]:
    """Delivery rows for every webhook of the tenant that subscribed to `event` (or `only` that one); their ids."""
    hooks = (
        [only]
        if only is not None
        else [
            hook
            for hook in session.scalars(select(Webhook).where(Webhook.tenant_id == tenant_id))
            if event in hook.events
        ]
    )
    if not hooks:
        return []
    payload = envelope(session, tenant_id, event, data)
    deliveries = [WebhookDelivery(webhook_id=h.id, tenant_id=tenant_id, event=event, payload=payload) for h in hooks]
    session.add_all(deliveries)
    session.flush()
    return [delivery.id for delivery in deliveries]


def audit_links(audit: Audit, settings: Settings) -> dict:
    base = f"{settings.resolved_public_url()}/v1/audits/{audit.id}"
    links = {"audit_url": base}
    if audit.status == AuditStatus.succeeded:
        links["report_url"] = f"{base}/report"
        if audit.report_html_sha256 and audit.report_token:
            links["report_html_url"] = f"{base}/report.html?token={audit.report_token}"
    return links


def audit_data(session: Session, audit: Audit, settings: Settings) -> dict:
    data: dict = {
        "audit": {
            "id": audit.id,
            "status": audit.status.value,
            "model_id": audit.model_id,
            "dataset_id": audit.dataset_id,
            "schedule_id": audit.schedule_id,
            "scheduled_for": audit.scheduled_for.isoformat() if audit.scheduled_for else None,
            "error": audit.error,
            **audit_links(audit, settings),
        }
    }
    if audit.status == AuditStatus.succeeded:
        try:
            data["verdict"] = assemble_report(audit).verdict.model_dump(mode="json")
        except ValueError:  # a stored result this version cannot read: the event goes out without its verdict
            log.exception("audit %s: no verdict for its webhook payload", audit.id)
            data["verdict"] = None
        data["changes"] = audit.changes
    return data


class AuditEnd(NamedTuple):
    """What claiming an audit's end recorded: its deliveries, and whether this call claimed a succeeded audit (whose
    MLflow run, when configured, the caller sends after commit: the same exactly-once claim)."""

    deliveries: list[str]
    claimed_success: bool


def record_audit_end(session: Session, audit_id: str, settings: Settings) -> AuditEnd:
    """audit.succeeded|failed|cancelled (and audit.verdict_changed) once per audit, by whichever process claims
    its `events_recorded_at` first; nothing when it has not ended or they are already recorded."""
    claimed = rows_matched(
        session,
        update(Audit)
        .where(Audit.id == audit_id, Audit.status.in_(ENDED), Audit.events_recorded_at.is_(None))
        .values(events_recorded_at=utcnow()),
    )
    if claimed != 1:
        return AuditEnd([], False)
    succeeded = session.scalar(select(Audit.status).where(Audit.id == audit_id)) == AuditStatus.succeeded
    subscribed = {event for hook in hooks_of(session, audit_id) for event in hook.events}
    if not subscribed & {"audit.succeeded", "audit.failed", "audit.cancelled", "audit.verdict_changed"}:
        return AuditEnd([], succeeded)  # nobody listens: the claim alone marks the audit announced
    audit = session.scalars(
        select(Audit)
        .where(Audit.id == audit_id)
        .options(selectinload(Audit.runs))
        .execution_options(populate_existing=True)
    ).one()
    data = audit_data(session, audit, settings)
    ids = record(session, audit.tenant_id, f"audit.{audit.status.value}", data)
    if audit.changes and audit.changes.get("verdict_changed"):
        ids += record(session, audit.tenant_id, "audit.verdict_changed", data)
    return AuditEnd(ids, succeeded)


def hooks_of(session: Session, audit_id: str) -> list[Webhook]:
    tenant_id = select(Audit.tenant_id).where(Audit.id == audit_id).scalar_subquery()
    return list(session.scalars(select(Webhook).where(Webhook.tenant_id == tenant_id)))


def unannounced_audits(session: Session, limit: int = 100) -> list[str]:
    return list(
        session.scalars(
            select(Audit.id)
            .where(Audit.status.in_(ENDED), Audit.events_recorded_at.is_(None))
            .order_by(Audit.finished_at)
            .limit(limit)
        )
    )


def record_schedule_fired(
    session: Session, schedule: Schedule, firing: ScheduleFiring, settings: Settings
) -> list[str]:
    data = {
        "schedule": {"id": schedule.id, "name": schedule.name},
        "firing": {
            "scheduled_for": firing.scheduled_for.isoformat(),
            "late": firing.late,
            "missed_ticks": firing.missed_ticks,
            "skipped_reason": firing.skipped_reason,
            "audit_id": firing.audit_id,
            "audit_url": f"{settings.resolved_public_url()}/v1/audits/{firing.audit_id}" if firing.audit_id else None,
        },
    }
    return record(session, schedule.tenant_id, "schedule.fired", data)
