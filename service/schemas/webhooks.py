"""Webhooks: a tenant's endpoint for events, and the log of deliveries to it."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.models import DeliveryStatus
from service.schemas.common import Text

EventName = Literal["audit.succeeded", "audit.failed", "audit.cancelled", "audit.verdict_changed", "schedule.fired"]


class WebhookIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://ci.example.com/hooks/pruneaudit",
                    "events": ["audit.succeeded", "audit.verdict_changed"],
                }
            ]
        },
    )

    url: Text = Field(max_length=2000, examples=["https://ci.example.com/hooks/pruneaudit"])
    events: list[EventName] = Field(min_length=1, examples=[["audit.succeeded", "audit.verdict_changed"]])


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    created_at: datetime
    url: str
    events: list[str]


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="The signing secret (Standard Webhooks, whsec_…), shown only now and after a rotation."
    )


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="The webhook-id header of every attempt of this delivery.")
    event: str
    created_at: datetime
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    total: int
    limit: int
    offset: int
