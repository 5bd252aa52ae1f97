"""Webhooks: register (URL checked, secret shown once), list, delete, rotate the secret, send a test event, read
the delivery log; and `check_url`, which the delivery task repeats before each attempt (DNS may change)."""

from __future__ import annotations

import base64
import ipaddress
import secrets
import socket
from datetime import timedelta
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import events
from service.errors import InvalidInput, NotFound
from service.models import Webhook, WebhookDelivery, utcnow
from service.schemas.webhooks import WebhookIn
from service.settings import Settings

ROTATION_OVERLAP = timedelta(hours=24)  # the old secret keeps signing this long after a rotation


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _refused_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified


def check_url(url: str, settings: Settings) -> None:
    """422 unless http(s) with a host that is not this service, and (unless turned off) not in a private range."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput(f"{url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("a webhook URL is http:// or https:// with a host")
    if parts.username or parts.password:
        raise InvalidInput("a webhook URL carries no credentials; verify the signature instead")
    own = urlsplit(settings.resolved_public_url())
    own_port = own.port or (443 if own.scheme == "https" else 80)
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        raise InvalidInput(f"the webhook host {parts.hostname!r} does not resolve") from None
    own_addresses = {settings.host, own.hostname or ""}
    if port in (own_port, settings.port) and (parts.hostname in own_addresses or addresses & own_addresses):
        raise InvalidInput("a webhook URL may not point at this service itself")
    if settings.webhook_refuse_private_urls and any(_refused_address(a) for a in addresses):
        raise InvalidInput(
            f"the webhook host {parts.hostname!r} resolves to a loopback, private, link-local or reserved address; "
            "this server refuses those (PRUNEAUDIT_WEBHOOK_REFUSE_PRIVATE_URLS)"
        )


def create_webhook(session: Session, tenant_id: str, body: WebhookIn, settings: Settings) -> Webhook:
    check_url(body.url, settings)
    hook = Webhook(tenant_id=tenant_id, url=body.url, events=sorted(set(body.events)), secret=new_secret())
    session.add(hook)
    session.flush()
    return hook


def get_webhook(session: Session, tenant_id: str, webhook_id: str) -> Webhook:
    hook = session.get(Webhook, webhook_id)
    if hook is None or hook.tenant_id != tenant_id:
        raise NotFound(f"webhook {webhook_id} does not exist")
    return hook


def list_webhooks(session: Session, tenant_id: str) -> list[Webhook]:
    return list(session.scalars(select(Webhook).where(Webhook.tenant_id == tenant_id).order_by(Webhook.created_at)))


def delete_webhook(session: Session, tenant_id: str, webhook_id: str) -> None:
    session.delete(get_webhook(session, tenant_id, webhook_id))


def rotate_secret(session: Session, tenant_id: str, webhook_id: str) -> Webhook:
    """A new secret; deliveries carry signatures by both for ROTATION_OVERLAP, so a receiver can switch over."""
    hook = get_webhook(session, tenant_id, webhook_id)
    hook.previous_secret, hook.previous_secret_until = hook.secret, utcnow() + ROTATION_OVERLAP
    hook.secret = new_secret()
    session.flush()
    return hook


def signing_secrets(hook: Webhook) -> list[str]:
    until = hook.previous_secret_until
    overlap = (
        hook.previous_secret is not None
        and until is not None
        and until.replace(tzinfo=None) > utcnow().replace(tzinfo=None)
    )
    return [hook.secret, *([hook.previous_secret] if overlap and hook.previous_secret else [])]


def send_test_event(session: Session, tenant_id: str, webhook_id: str) -> str:
    hook = get_webhook(session, tenant_id, webhook_id)
    data = {"message": "a test event from pruneaudit", "webhook_id": hook.id}
    return events.record(session, tenant_id, events.TEST_EVENT, data, only=hook)[0]


def list_deliveries(
    session: Session, tenant_id: str, webhook_id: str, limit: int, offset: int
) -> tuple[list[WebhookDelivery], int]:
    get_webhook(session, tenant_id, webhook_id)
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = session.scalars(query.order_by(WebhookDelivery.created_at.desc()).limit(limit).offset(offset))
    return list(items), total


def delivery(session: Session, delivery_id: str) -> WebhookDelivery:
    return session.get_one(WebhookDelivery, delivery_id)
