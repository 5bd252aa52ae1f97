"""Schedules: an audit spec template fired on a cron expression (in a time zone) or at a fixed interval."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.schemas.audits import AuditSpec
from service.schemas.common import Text


class ScheduleIn(BaseModel):
    # Every JSON request body has an example that passes validation as it is (test_request_examples.py).
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "nightly fraud-scorer",
                    "spec": {
                        "model": {"name": "fraud-scorer", "version": "latest"},
                        "dataset": {"name": "holdout", "version": "latest"},
                        "group_by": ["sex"],
                        "pruning": {"ratios": [0.5, 0.7, 0.9]},
                    },
                    "cron": "0 2 * * *",
                    "timezone": "Europe/Berlin",
                    "skip_if_unchanged": True,
                }
            ]
        },
    )

    name: Text | None = Field(None, max_length=200, examples=["nightly fraud-scorer"])
    spec: AuditSpec = Field(
        description='The audit to create at each tick; name the model {"name": …, "version": "latest"} to audit '
        "the newest upload then."
    )
    cron: Text | None = Field(None, max_length=200, examples=["0 2 * * *"], description="Cron expression (5 fields).")
    timezone: Text = Field("UTC", max_length=64, examples=["Europe/Berlin"], description="IANA zone of `cron`.")
    interval_s: float | None = Field(None, gt=0, le=366 * 86400, description="Instead of cron: every this many s.")
    paused: bool = False
    skip_if_unchanged: bool = Field(
        False, description="No audit when the resolved model, dataset and spec equal the last firing's."
    )
    change_threshold: float = Field(
        0.02, ge=0, le=1, description="The worst group's ψ or accuracy drop growing by more than this is a change."
    )

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleIn:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("give exactly one of cron and interval_s")
        return self


class SchedulePatch(BaseModel):
    """Fields to change; a new cron or interval_s replaces the other."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"cron": "30 3 * * 1-5", "timezone": "UTC", "paused": False}]}
    )

    name: Text | None = Field(None, max_length=200)
    spec: AuditSpec | None = None
    cron: Text | None = Field(None, max_length=200)
    timezone: Text | None = Field(None, max_length=64)
    interval_s: float | None = Field(None, gt=0, le=366 * 86400)
    paused: bool | None = None
    skip_if_unchanged: bool | None = None
    change_threshold: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _one_timing(self) -> SchedulePatch:
        if self.cron is not None and self.interval_s is not None:
            raise ValueError("give at most one of cron and interval_s")
        return self


class ScheduleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str | None
    created_at: datetime
    spec: dict
    cron: str | None
    timezone: str
    interval_s: float | None
    paused: bool
    skip_if_unchanged: bool
    change_threshold: float
    next_run_at: datetime | None = Field(description="The next tick (null while paused).")


class SchedulePage(BaseModel):
    items: list[ScheduleOut]
    total: int
    limit: int
    offset: int


class FiringOut(BaseModel):
    """One tick: the audit it created, or why none (skipped_reason); late when the sweeper was down at the tick."""

    model_config = ConfigDict(from_attributes=True)

    scheduled_for: datetime
    fired_at: datetime
    late: bool
    late_by_s: float
    missed_ticks: int = Field(description="Further ticks that passed during downtime: fired once, as this one.")
    audit_id: str | None
    audit_status: str | None = None
    skipped_reason: str | None
    model_id: str | None
    dataset_id: str | None


class FiringPage(BaseModel):
    items: list[FiringOut]
    total: int
    limit: int
    offset: int
