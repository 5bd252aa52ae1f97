"""tenants and API keys: every model, dataset and audit belongs to a tenant; Idempotency-Keys are per tenant;
an audit's HTML report has a share token

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Rows written before tenancy existed belong to this tenant; `pruneaudit keys create --tenant default` reaches them.
DEFAULT_TENANT = "default"
OWNED = ("models", "datasets", "audits")


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.bulk_insert(tenants, [{"id": DEFAULT_TENANT, "name": DEFAULT_TENANT, "created_at": datetime.now(UTC)}])
    for table in OWNED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("tenant_id", sa.String(length=32), nullable=False, server_default=DEFAULT_TENANT)
            )
            batch_op.create_foreign_key(f"fk_{table}_tenant_id_tenants", "tenants", ["tenant_id"], ["id"])
            batch_op.create_index(f"ix_{table}_tenant_id", ["tenant_id"])
    with op.batch_alter_table("audits", schema=None) as batch_op:
        batch_op.drop_constraint("uq_audits_idempotency_key", type_="unique")
        batch_op.create_unique_constraint("uq_audits_tenant_idempotency_key", ["tenant_id", "idempotency_key"])
        # Audits from before have no share link for their HTML report; their tenant's key still opens it.
        batch_op.add_column(sa.Column("report_token", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audits", schema=None) as batch_op:
        batch_op.drop_column("report_token")
        batch_op.drop_constraint("uq_audits_tenant_idempotency_key", type_="unique")
        batch_op.create_unique_constraint("uq_audits_idempotency_key", ["idempotency_key"])
    for table in OWNED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"ix_{table}_tenant_id")
            batch_op.drop_constraint(f"fk_{table}_tenant_id_tenants", type_="foreignkey")
            batch_op.drop_column("tenant_id")
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
