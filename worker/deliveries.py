"""Webhook deliveries: one task per attempt, signed per Standard Webhooks, retried with exponential backoff and
full jitter until `webhook_retry_window_s` has passed since the event.

The delivery row (committed before its task is sent) is the truth: an attempt claims it with a conditional UPDATE
that moves `next_attempt_at` one lease ahead and counts the attempt, so a duplicate message sends nothing while
an attempt runs; the outcome is written only by the attempt that claimed it. A worker killed mid-attempt leaves
the row pending with a past `next_attempt_at` once its lease ends, and the sweeper sends it again: the receiver
sees the same `webhook-id` (deduplicate on it). No torch here."""

from __future__ import annotations

import json
import logging
import random
from datetime import timedelta

import httpx
from sqlalchemy import update
from standardwebhooks.webhooks import Webhook as Signer

from service import events
from service.db import rows_matched, session_scope
from service.errors import InvalidInput
from service.models import DeliveryStatus, Webhook, WebhookDelivery, as_utc, utcnow
from service.queue import DELIVER_WEBHOOK_TASK, enqueue_delivery, enqueue_mlflow_log
from service.schedules import send_after_commit
from service.settings import Settings, get_settings
from service.webhooks import check_url, signing_secrets
from worker.celery_app import app

log = logging.getLogger(__name__)
EARLY_SLACK = timedelta(seconds=1)  # a countdown message may arrive a little before its row says it is due


def backoff_s(attempts: int, settings: Settings) -> float:
    """Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"): uniform in [base/2, base · 2^(n-1)]."""
    ceiling = min(settings.webhook_backoff_max_s, settings.webhook_backoff_base_s * 2 ** (attempts - 1))
    return random.uniform(min(settings.webhook_backoff_base_s / 2, ceiling), ceiling)


def claim(delivery_id: str, settings: Settings) -> tuple[WebhookDelivery, Webhook, int] | None:
    now = utcnow()
    lease = timedelta(seconds=settings.webhook_timeout_s + 5)  # an attempt ends within its timeout
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.status != DeliveryStatus.pending:
            return None
        attempt = delivery.attempts + 1
        claimed = rows_matched(
            session,
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == DeliveryStatus.pending,
                WebhookDelivery.attempts == delivery.attempts,
                WebhookDelivery.next_attempt_at <= now + EARLY_SLACK,
            )
            .values(attempts=attempt, next_attempt_at=now + lease)
            # The loaded row holds SQLite's naive datetimes: no in-Python evaluation of the criteria.
            .execution_options(synchronize_session=False),
        )
        if claimed != 1:
            return None
        hook = session.get_one(Webhook, delivery.webhook_id)
        session.expunge_all()
    return delivery, hook, attempt


def signed_headers(delivery: WebhookDelivery, hook: Webhook, body: str) -> dict[str, str]:
    timestamp = utcnow()
    signatures = [Signer(secret).sign(delivery.id, timestamp, body) for secret in signing_secrets(hook)]
    return {
        "content-type": "application/json",
        "user-agent": "pruneaudit-webhooks/1",
        "webhook-id": delivery.id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


def post(delivery: WebhookDelivery, hook: Webhook, settings: Settings) -> tuple[int | None, str | None]:
    """(status code, error): one attempt; redirects are not followed (a 3xx is a failure, as the spec advises)."""
    try:
        check_url(hook.url, settings)  # again: the host's addresses may have changed since it was registered
    except InvalidInput as exc:
        return None, exc.detail
    body = json.dumps(delivery.payload, separators=(",", ":"))
    try:
        response = httpx.post(
            hook.url,
            content=body,
            headers=signed_headers(delivery, hook, body),
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
        )
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    return response.status_code, None if response.is_success else f"HTTP {response.status_code}"


def attempt_delivery(delivery_id: str) -> None:
    settings = get_settings()
    claimed = claim(delivery_id, settings)
    if claimed is None:
        log.info("delivery %s is not due (delivered, given up, or an attempt is running); nothing to do", delivery_id)
        return
    delivery, hook, attempt = claimed
    code, error = post(delivery, hook, settings)
    now = utcnow()
    values: dict = dict(last_status_code=code, last_error=error)
    retry_in = None
    if error is None:
        values.update(status=DeliveryStatus.delivered, delivered_at=now)
    elif now + timedelta(seconds=(delay := backoff_s(attempt, settings))) > as_utc(delivery.created_at) + timedelta(
        seconds=settings.webhook_retry_window_s
    ):
        values.update(status=DeliveryStatus.failed)
    else:
        values.update(next_attempt_at=now + timedelta(seconds=delay))
        retry_in = delay
    with session_scope() as session:
        owned = (WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempt)
        outcome = update(WebhookDelivery).where(*owned).values(**values)
        if rows_matched(session, outcome.execution_options(synchronize_session=False)) != 1:
            return
    log.info("delivery %s attempt %d to %s: %s", delivery_id, attempt, hook.url, error or code)
    if retry_in is not None:
        send(delivery_id, retry_in)


def send(delivery_id: str, countdown: float | None = None) -> None:
    try:
        enqueue_delivery(delivery_id, countdown)
    except Exception:
        log.exception("delivery %s: could not enqueue; the sweeper sends it again", delivery_id)


def announce_end(audit_id: str) -> None:
    """The audit's end events, recorded once (whoever claims them first: this worker or a sweeper), then sent."""
    settings = get_settings()
    try:
        with session_scope() as session:
            end = events.record_audit_end(session, audit_id, settings)
    except Exception:
        log.exception("audit %s: could not record its end events; the sweeper records them", audit_id)
        return
    for delivery_id in end.deliveries:
        send(delivery_id)
    if end.claimed_success and settings.mlflow_tracking_uri:
        send_after_commit(enqueue_mlflow_log, audit_id)


@app.task(name=DELIVER_WEBHOOK_TASK)
def deliver_webhook(delivery_id: str) -> None:
    attempt_delivery(delivery_id)
