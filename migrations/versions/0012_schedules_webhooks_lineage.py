"""model lineage (version, labels), schedules and their firings, webhooks and their deliveries, audit changes

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _timestamps() -> list[sa.Column]:
    return [sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)]


def upgrade() -> None:
    for table in ("models", "datasets"):
        op.add_column(table, sa.Column("version", sa.String(length=100), nullable=True))
        op.add_column(table, sa.Column("labels", sa.JSON(), nullable=True))
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("tenant_id", sa.String(length=32), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        *_timestamps(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("interval_s", sa.Float(), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("skip_if_unchanged", sa.Boolean(), nullable=False),
        sa.Column("change_threshold", sa.Float(), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_schedules_tenant_id", "schedules", ["tenant_id"])
    op.create_index("ix_schedules_next_run_at", "schedules", ["next_run_at"])
    # No ON DELETE (SQLite does not reflect one added this way): deleting a schedule detaches its audits first.
    # Plain ALTER TABLE ... ADD COLUMN, never a batch copy of `audits`: on SQLite a copy drops the old table, and
    # with foreign keys on (service/db.py) that cascades to every run.
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE audits ADD COLUMN schedule_id VARCHAR(32) REFERENCES schedules (id)")
    else:
        op.add_column("audits", sa.Column("schedule_id", sa.String(length=32), nullable=True))
        op.create_foreign_key("fk_audits_schedule_id_schedules", "audits", "schedules", ["schedule_id"], ["id"])
    op.add_column("audits", sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=True))
    op.add_column("audits", sa.Column("changes", sa.JSON(), nullable=True))
    op.add_column("audits", sa.Column("events_recorded_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_audits_schedule_id", "audits", ["schedule_id"])
    # Audits from before webhooks existed have nothing to announce.
    op.execute("UPDATE audits SET events_recorded_at = updated_at")
    op.create_table(
        "schedule_firings",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column(
            "schedule_id", sa.String(length=32), sa.ForeignKey("schedules.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("late_by_s", sa.Float(), nullable=False),
        sa.Column("late", sa.Boolean(), nullable=False),
        sa.Column("missed_ticks", sa.Integer(), nullable=False),
        sa.Column("audit_id", sa.String(length=32), sa.ForeignKey("audits.id", ondelete="SET NULL"), nullable=True),
        sa.Column("skipped_reason", sa.Text(), nullable=True),
        sa.Column("model_id", sa.String(length=32), nullable=True),
        sa.Column("dataset_id", sa.String(length=32), nullable=True),
        sa.Column("spec_sha256", sa.String(length=64), nullable=True),
        sa.UniqueConstraint("schedule_id", "scheduled_for", name="uq_schedule_firings_tick"),
    )
    op.create_index("ix_schedule_firings_schedule_id", "schedule_firings", ["schedule_id"])
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("tenant_id", sa.String(length=32), sa.ForeignKey("tenants.id"), nullable=False),
        *_timestamps(),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("previous_secret", sa.String(length=100), nullable=True),
        sa.Column("previous_secret_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_webhooks_tenant_id", "webhooks", ["tenant_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column("webhook_id", sa.String(length=32), sa.ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        *_timestamps(),
        sa.Column(
            "status",
            sa.Enum("pending", "delivered", "failed", name="deliverystatus", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    )
    for column in ("webhook_id", "tenant_id", "status", "next_attempt_at"):
        op.create_index(f"ix_webhook_deliveries_{column}", "webhook_deliveries", [column])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhooks")
    op.drop_table("schedule_firings")
    op.drop_index("ix_audits_schedule_id", table_name="audits")
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint("fk_audits_schedule_id_schedules", "audits", type_="foreignkey")
    # SQLite ≥ 3.35 drops a column in place (no table copy, so no cascade to the runs).
    for column in ("events_recorded_at", "changes", "scheduled_for", "schedule_id"):
        op.drop_column("audits", column)
    op.drop_table("schedules")
    for table in ("datasets", "models"):
        op.drop_column(table, "labels")
        op.drop_column(table, "version")
