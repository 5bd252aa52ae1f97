"""ORM models. The audit row is the source of truth for an audit's state; results live in `runs`, one per
method × ratio × mitigation plus the dense baseline, each with its own state (runs are computed by separate
tasks, on any worker) and, once succeeded, its typed result (results.runs.RunResult) as JSON."""

from __future__ import annotations

import enum
import secrets
import uuid
from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Enum, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes (stored in UTC), PostgreSQL aware ones: both as aware UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class AuditStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class RunStatus(str, enum.Enum):
    """queued → running → succeeded | failed | cancelled; a run whose worker vanished goes back to queued."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"  # never computed, or stopped: the audit was cancelled or failed first


class Tenant(Base):
    """A team: every model, dataset and audit belongs to one, and is visible only with one of its keys."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key `pa_<id>_<secret>`: only the secret's SHA-256 is stored (the key is shown once, at creation)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    name: Mapped[str | None] = mapped_column(String(200))
    # Lineage: a spec may name a model by (name, version), "latest" being the newest upload of that name.
    version: Mapped[str | None] = mapped_column(String(100))
    labels: Mapped[dict | None] = mapped_column(JSON)  # free strings, e.g. {"git_commit": "…"}
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    architecture: Mapped[dict] = mapped_column(JSON)
    architecture_name: Mapped[str] = mapped_column(String(64))
    parameter_count: Mapped[int] = mapped_column(Integer)
    input_shape: Mapped[list] = mapped_column(JSON)
    num_classes: Mapped[int] = mapped_column(Integer)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    name: Mapped[str | None] = mapped_column(String(200))
    version: Mapped[str | None] = mapped_column(String(100))
    labels: Mapped[dict | None] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    format: Mapped[str] = mapped_column(String(8))
    size_bytes: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    feature_shape: Mapped[list] = mapped_column(JSON)
    classes: Mapped[list] = mapped_column(JSON)
    groups: Mapped[dict] = mapped_column(JSON)


class Audit(Base):
    __tablename__ = "audits"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_audits_tenant_idempotency_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    status: Mapped[AuditStatus] = mapped_column(
        Enum(AuditStatus, native_enum=False, length=16), default=AuditStatus.queued, index=True
    )
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    spec: Mapped[dict] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the dense baseline was stored and the runs queued. Until then the audit's own heartbeat shows its worker
    # is alive (a stale one re-queues the whole audit); from then on each run has its heartbeat and is redone alone.
    runs_queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Idempotency-Key of the POST that created the audit, and a digest of its body (IETF draft semantics).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_digest: Mapped[str | None] = mapped_column(String(64))
    environment: Mapped[dict | None] = mapped_column(JSON)
    report_html_sha256: Mapped[str | None] = mapped_column(String(64))
    # A read-only capability for the HTML report alone (a link a person can open in a browser, which cannot send
    # the X-API-Key header): 192 random bits, checked in constant time.
    report_token: Mapped[str | None] = mapped_column(String(64), default=lambda: secrets.token_urlsafe(24))
    # Set when a schedule fired it (service/schedules.py): which schedule, for which tick.
    schedule_id: Mapped[str | None] = mapped_column(ForeignKey("schedules.id"), index=True)
    scheduled_for: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What moved since the previous audit of its schedule (service/changes.py), written with the report.
    changes: Mapped[dict | None] = mapped_column(JSON)
    # When its end events (audit.succeeded|failed|cancelled) were recorded for webhooks (service/events.py):
    # a conditional UPDATE of this column records them exactly once, whichever process sees the end first.
    events_recorded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    model: Mapped[Model] = relationship()
    dataset: Mapped[Dataset] = relationship()
    runs: Mapped[list[Run]] = relationship(
        back_populates="audit", order_by="Run.position", cascade="all, delete-orphan"
    )


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("audit_id", "position", name="uq_runs_audit_position"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    status: Mapped[RunStatus] = mapped_column(
        Enum(RunStatus, native_enum=False, length=16), default=RunStatus.queued, index=True
    )
    # Every state change of a run matches its attempt, as audits do: a worker that comes back after its run was
    # re-queued writes nothing.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The position of the run whose saved weights and masks this one starts from (a mitigation placed 'after'
    # pruning); it is enqueued once that run has succeeded.
    starts_from: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))  # hostname and pid of the worker that computed it
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str] = mapped_column(String(64), default="dense")
    method: Mapped[str] = mapped_column(String(32))
    scope: Mapped[str | None] = mapped_column(String(16))
    ratio: Mapped[float] = mapped_column(Float)
    mitigation: Mapped[str] = mapped_column(String(32), default="none", server_default="none")
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    onnx_sha256: Mapped[str | None] = mapped_column(String(64))  # an imported ONNX model's pruned graph
    # results.runs.RunResult as JSON, once succeeded: what the worker computed is what the report serves.
    result: Mapped[dict | None] = mapped_column(JSON)

    audit: Mapped[Audit] = relationship(back_populates="runs")


class Schedule(Base):
    """An audit spec template fired on a cron expression (in a time zone) or every `interval_s` by the sweeper."""

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    spec: Mapped[dict] = mapped_column(JSON)  # an AuditSpec, whose model/dataset may be (name, version) refs
    cron: Mapped[str | None] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    interval_s: Mapped[float | None] = mapped_column(Float)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    skip_if_unchanged: Mapped[bool] = mapped_column(Boolean, default=False)
    # Change detection: the worst group's ψ or accuracy drop growing by more than this is a change.
    change_threshold: Mapped[float] = mapped_column(Float, default=0.02)
    # The tick to fire next; firing moves it with a conditional UPDATE (the claim that makes firing exactly once).
    next_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class ScheduleFiring(Base):
    """One tick of a schedule: the audit it created, or why it created none; late when fired after downtime."""

    __tablename__ = "schedule_firings"
    __table_args__ = (UniqueConstraint("schedule_id", "scheduled_for", name="uq_schedule_firings_tick"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    schedule_id: Mapped[str] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"), index=True)
    scheduled_for: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    fired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    late_by_s: Mapped[float] = mapped_column(Float, default=0.0)
    late: Mapped[bool] = mapped_column(
        Boolean, default=False
    )  # fired after downtime (PRUNEAUDIT_SCHEDULE_LATE_AFTER_S)
    missed_ticks: Mapped[int] = mapped_column(Integer, default=0)  # ticks passed in downtime, fired as this one
    audit_id: Mapped[str | None] = mapped_column(ForeignKey("audits.id", ondelete="SET NULL"))
    skipped_reason: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(32))
    dataset_id: Mapped[str | None] = mapped_column(String(32))
    spec_sha256: Mapped[str | None] = mapped_column(String(64))


class Webhook(Base):
    """A tenant's endpoint for events, signed per Standard Webhooks with `secret` (whsec_…, shown once)."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(100))  # the signing key itself: HMAC needs it, a hash would not do
    # The secret replaced by the last rotation stays valid until then, so receivers can switch over.
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DeliveryStatus(str, enum.Enum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"  # gave up: the retry window passed


class WebhookDelivery(Base):
    """One event to one webhook. Committed before its task is sent; its id is the `webhook-id` of every attempt."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: f"msg_{new_id()}")
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[DeliveryStatus] = mapped_column(
        Enum(DeliveryStatus, native_enum=False, length=16), default=DeliveryStatus.pending, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt may start; an attempt claims the row by moving it one lease ahead.
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
