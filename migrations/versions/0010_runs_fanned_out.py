"""runs fanned out across workers: each run has its own state, attempts, heartbeat, worker and times; the audit
records when its baseline was stored and its runs queued

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

runs = sa.table(
    "runs",
    sa.column("audit_id", sa.String),
    sa.column("status", sa.String),
    sa.column("attempts", sa.Integer),
    sa.column("updated_at", sa.DateTime(timezone=True)),
    sa.column("finished_at", sa.DateTime(timezone=True)),
)
audits = sa.table(
    "audits", sa.column("id", sa.String), sa.column("status", sa.String), sa.column("finished_at", sa.DateTime)
)
TIMES = ("heartbeat_at", "started_at", "finished_at")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def upgrade() -> None:
    with op.batch_alter_table("audits", schema=None) as batch_op:
        batch_op.add_column(sa.Column("runs_queued_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status", sa.Enum(*STATUSES, native_enum=False, length=16), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("starts_from", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("worker", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        for name in TIMES:
            batch_op.add_column(sa.Column(name, sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
    # Until now a run row was written only with its audit's results, all at once: every stored run succeeded,
    # once, when its audit finished.
    finished = sa.select(audits.c.finished_at).where(audits.c.id == runs.c.audit_id).scalar_subquery()
    op.execute(
        runs.update().values(
            status="succeeded", attempts=1, finished_at=finished, updated_at=sa.func.coalesce(finished, sa.func.now())
        )
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("status", existing_type=sa.String(length=16), nullable=False)
        batch_op.alter_column("attempts", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("updated_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch_op.alter_column("result", existing_type=sa.JSON(), nullable=True)
        batch_op.create_index("ix_runs_status", ["status"], unique=False)
        batch_op.create_unique_constraint("uq_runs_audit_position", ["audit_id", "position"])


def downgrade() -> None:
    # Revision 0009 stores runs only for succeeded audits, all at once; the older code redoes an unfinished audit
    # from the start, so the runs of audits that have not succeeded are removed.
    unfinished = sa.select(audits.c.id).where(audits.c.status != "succeeded")
    op.execute(runs.delete().where(runs.c.audit_id.in_(unfinished)))
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_runs_audit_position", type_="unique")
        batch_op.drop_index("ix_runs_status")
        batch_op.alter_column("result", existing_type=sa.JSON(), nullable=False)
        for name in ("error", *TIMES, "updated_at", "worker", "starts_from", "attempts", "status"):
            batch_op.drop_column(name)
    # Not a batch rebuild: on SQLite that recreates `audits`, and its foreign keys would cascade-delete every run.
    op.drop_column("audits", "runs_queued_at")
