"""pruning methods and outputs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("label", sa.String(length=64), nullable=False, server_default="dense"))
        batch_op.add_column(sa.Column("recipe", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("compression", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("weights_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("weights_sha256")
        batch_op.drop_column("compression")
        batch_op.drop_column("recipe")
        batch_op.drop_column("label")
