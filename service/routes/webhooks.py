from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Response

from service import webhooks
from service.dependencies import SessionDep, SettingsDep, TenantDep, releases_connection
from service.queue import enqueue_delivery
from service.schemas.common import PROBLEM_RESPONSES, PathId
from service.schemas.webhooks import DeliveryOut, DeliveryPage, WebhookCreated, WebhookIn, WebhookOut

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=PROBLEM_RESPONSES)


@router.post("", status_code=201, response_model=WebhookCreated)
@releases_connection
def create_webhook(body: WebhookIn, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> WebhookCreated:
    """Register an endpoint for events. Deliveries are signed per Standard Webhooks (webhook-id, webhook-timestamp,
    webhook-signature) with the returned secret, which is shown only here; verify every one."""
    return WebhookCreated.model_validate(webhooks.create_webhook(session, tenant, body, settings))


@router.get("", response_model=list[WebhookOut])
@releases_connection
def list_webhooks(session: SessionDep, tenant: TenantDep) -> list[WebhookOut]:
    return [WebhookOut.model_validate(hook) for hook in webhooks.list_webhooks(session, tenant)]


@router.get("/{webhook_id}", response_model=WebhookOut)
@releases_connection
def read_webhook(webhook_id: PathId, session: SessionDep, tenant: TenantDep) -> WebhookOut:
    return WebhookOut.model_validate(webhooks.get_webhook(session, tenant, webhook_id))


@router.delete("/{webhook_id}", status_code=204, response_class=Response)
@releases_connection
def delete_webhook(webhook_id: PathId, session: SessionDep, tenant: TenantDep) -> Response:
    webhooks.delete_webhook(session, tenant, webhook_id)
    return Response(status_code=204)


@router.post("/{webhook_id}/rotate-secret", response_model=WebhookCreated)
@releases_connection
def rotate_secret(webhook_id: PathId, session: SessionDep, tenant: TenantDep) -> WebhookCreated:
    """A new secret (shown once); for 24 hours deliveries carry signatures by the old and the new one."""
    return WebhookCreated.model_validate(webhooks.rotate_secret(session, tenant, webhook_id))


@router.post("/{webhook_id}/test", status_code=202, response_model=DeliveryOut)
@releases_connection
def send_test_event(webhook_id: PathId, session: SessionDep, tenant: TenantDep) -> DeliveryOut:
    """Send a `webhook.test` event to this webhook; follow it in the delivery log."""
    delivery_id = webhooks.send_test_event(session, tenant, webhook_id)
    session.commit()  # the row first, then its task
    try:
        enqueue_delivery(delivery_id)
    except Exception:
        log.exception("could not enqueue delivery %s; the sweeper sends it again", delivery_id)
    return DeliveryOut.model_validate(webhooks.delivery(session, delivery_id))


@router.get("/{webhook_id}/deliveries", response_model=DeliveryPage)
@releases_connection
def list_deliveries(
    webhook_id: PathId,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> DeliveryPage:
    """The delivery log, newest first: status, attempts, the last response code or error."""
    items, total = webhooks.list_deliveries(session, tenant, webhook_id, limit, offset)
    return DeliveryPage(items=[DeliveryOut.model_validate(d) for d in items], total=total, limit=limit, offset=offset)
