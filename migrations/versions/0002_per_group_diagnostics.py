"""per-group diagnostics

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("group_metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("small_group", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("dense_gradient_norm", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("gradient_norm", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("predicted_excessive_loss", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("details", sa.JSON(), nullable=False, server_default="{}"))

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("delta_norm", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("notes", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("notes")
        batch_op.drop_column("delta_norm")

    with op.batch_alter_table("group_metrics", schema=None) as batch_op:
        batch_op.drop_column("details")
        batch_op.drop_column("predicted_excessive_loss")
        batch_op.drop_column("gradient_norm")
        batch_op.drop_column("dense_gradient_norm")
        batch_op.drop_column("small_group")
