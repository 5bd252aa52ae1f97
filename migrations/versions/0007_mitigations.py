"""mitigations: a run's mitigation and its details, train-split metrics, and the split of each group row

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mitigation", sa.String(length=32), nullable=False, server_default="none"))
        batch_op.add_column(sa.Column("mitigation_details", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("train_overall", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("train_attributes", sa.JSON(), nullable=True))
    with op.batch_alter_table("group_metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("split", sa.String(length=8), nullable=False, server_default="eval"))


def downgrade() -> None:
    with op.batch_alter_table("group_metrics", schema=None) as batch_op:
        batch_op.drop_column("split")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("train_attributes")
        batch_op.drop_column("train_overall")
        batch_op.drop_column("mitigation_details")
        batch_op.drop_column("mitigation")
