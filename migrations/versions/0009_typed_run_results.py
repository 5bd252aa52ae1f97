"""typed run results: each run stores its results.runs.RunResult as one JSON column; the per-group rows
(group_metrics) and the run's figure columns are folded into it

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from results.groups import BinaryRates, BoundaryProxies, ConfidenceIntervals, Confusion, Flips, GroupDiagnostics

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The group row's own columns; every other figure lived in its `details` JSON, split into sections here exactly
# as the report did before this revision.
GROUP_COLUMNS = (
    "group",
    "n",
    "share",
    "dense_accuracy",
    "accuracy",
    "dense_loss",
    "loss",
    "accuracy_drop",
    "excess_accuracy_gap",
    "excessive_loss",
    "small_group",
)
SECTIONS = {
    "confidence_intervals": ConfidenceIntervals,
    "boundary": BoundaryProxies,
    "flips": Flips,
    "confusion": Confusion,
    "binary": BinaryRates,
    "diagnostics": GroupDiagnostics,
}
FIGURE_COLUMNS = {  # run columns of revision 0008 → their JSON types
    "achieved_sparsity": sa.Float(),
    "layer_sparsity": sa.JSON(),
    "seconds": sa.Float(),
    "overall": sa.JSON(),
    "attributes": sa.JSON(),
    "delta_norm": sa.Float(),
    "notes": sa.JSON(),
    "recipe": sa.JSON(),
    "compression": sa.JSON(),
    "mitigation_details": sa.JSON(),
    "train_overall": sa.JSON(),
    "train_attributes": sa.JSON(),
}
# Run columns of 0008 that are fields of the same name in the result.
SAME_NAMED = (
    "achieved_sparsity",
    "layer_sparsity",
    "seconds",
    "delta_norm",
    "compression",
    "recipe",
    "notes",
    "overall",
    "mitigation_details",
)
NULLABLE = {"delta_norm", "mitigation_details", "train_overall", "train_attributes"}
IDENTITY = ("label", "method", "scope", "ratio", "mitigation")

runs = sa.table(
    "runs",
    sa.column("id", sa.String),
    sa.column("result", sa.JSON),
    *(sa.column(name, kind) for name, kind in FIGURE_COLUMNS.items()),
    *(sa.column(name) for name in IDENTITY),
)
group_metrics = sa.table(
    "group_metrics",
    sa.column("run_id", sa.String),
    sa.column("position", sa.Integer),
    sa.column("split", sa.String),
    sa.column("attribute", sa.String),
    sa.column("details", sa.JSON),
    sa.column("dense_gradient_norm", sa.Float),
    sa.column("gradient_norm", sa.Float),
    sa.column("predicted_excessive_loss", sa.Float),
    *(sa.column(name) for name in GROUP_COLUMNS),
)


def _group(row) -> dict:
    details = row.details or {}
    group = {name: getattr(row, name) for name in GROUP_COLUMNS}
    for section, model in SECTIONS.items():
        group[section] = {name: details.get(name) for name in model.model_fields}
    return group | {"undefined": details.get("undefined", {})}


def _attributes(summaries: dict, rows: list, split: str, with_diagnostics: bool) -> list[dict]:
    attributes = []
    for attribute, summary in summaries.items():
        entry = {
            "attribute": attribute,
            "n_missing": summary["n_missing"],
            "groups": [_group(row) for row in rows if row.split == split and row.attribute == attribute],
            "aggregates": summary["aggregates"],
            "undefined": summary["undefined"],
            "caveats": summary["caveats"],
        }
        if with_diagnostics:
            entry["diagnostics"] = summary["diagnostics"]
        attributes.append(entry)
    return attributes


def _result(run, rows: list) -> dict:
    train = None
    if run.train_overall is not None:
        train = {"overall": run.train_overall, "attributes": _attributes(run.train_attributes, rows, "train", False)}
    return {
        **{name: getattr(run, name) for name in IDENTITY},
        **{name: getattr(run, name) for name in SAME_NAMED},
        "attributes": _attributes(run.attributes, rows, "eval", True),
        "train": train,
    }


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result", sa.JSON(), nullable=True))
    connection = op.get_bind()
    for run in connection.execute(sa.select(runs)).all():
        rows = connection.execute(
            sa.select(group_metrics).where(group_metrics.c.run_id == run.id).order_by(group_metrics.c.position)
        ).all()
        connection.execute(runs.update().where(runs.c.id == run.id).values(result=_result(run, rows)))
    op.drop_index("ix_group_metrics_run_attribute", table_name="group_metrics")
    op.drop_table("group_metrics")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("result", existing_type=sa.JSON(), nullable=False)
        for name in FIGURE_COLUMNS:
            batch_op.drop_column(name)


def _rows(run_id: str, result: dict) -> list[dict]:
    rows = []
    splits = [("eval", result["attributes"])] + ([("train", result["train"]["attributes"])] if result["train"] else [])
    for split, attributes in splits:
        for attribute in attributes:
            for group in attribute["groups"]:
                details = {name: value for section in SECTIONS for name, value in group[section].items()}
                diagnostics = group["diagnostics"]
                rows.append(
                    {
                        "run_id": run_id,
                        "position": len(rows),
                        "split": split,
                        "attribute": attribute["attribute"],
                        **{name: group[name] for name in GROUP_COLUMNS},
                        "dense_gradient_norm": diagnostics["dense_gradient_norm"],
                        "gradient_norm": diagnostics["gradient_norm"],
                        "predicted_excessive_loss": diagnostics["predicted_excessive_loss"],
                        "details": details | {"undefined": group["undefined"]},
                    }
                )
    return rows


def _summaries(attributes: list[dict], with_diagnostics: bool) -> dict:
    keys = ("n_missing", "undefined", "caveats", "aggregates") + (("diagnostics",) if with_diagnostics else ())
    return {attribute["attribute"]: {key: attribute[key] for key in keys} for attribute in attributes}


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for name, kind in FIGURE_COLUMNS.items():
            batch_op.add_column(sa.Column(name, kind, nullable=True))
    connection = op.get_bind()
    stored = connection.execute(sa.select(runs.c.id, runs.c.result)).all()
    for run_id, result in stored:
        train = result["train"]
        connection.execute(
            runs.update()
            .where(runs.c.id == run_id)
            .values(
                **{name: result[name] for name in SAME_NAMED},
                attributes=_summaries(result["attributes"], True),
                train_overall=train["overall"] if train else None,
                train_attributes=_summaries(train["attributes"], False) if train else None,
            )
        )
    # Before group_metrics exists: on SQLite the batch rebuild of `runs` would cascade-delete its rows.
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for name in FIGURE_COLUMNS:
            if name not in NULLABLE:
                batch_op.alter_column(name, existing_type=FIGURE_COLUMNS[name], nullable=False)
        batch_op.drop_column("result")
    _create_group_metrics()
    rows = [row for run_id, result in stored for row in _rows(run_id, result)]
    if rows:
        connection.execute(group_metrics.insert(), rows)


def _create_group_metrics() -> None:
    op.create_table(
        "group_metrics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False, server_default="eval"),
        sa.Column("attribute", sa.String(length=64), nullable=False),
        sa.Column("group", sa.String(length=200), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.Float(), nullable=False) for name in GROUP_COLUMNS[2:-1]),
        sa.Column("small_group", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("dense_gradient_norm", sa.Float(), nullable=True),
        sa.Column("gradient_norm", sa.Float(), nullable=True),
        sa.Column("predicted_excessive_loss", sa.Float(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False, server_default="{}"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_group_metrics_run_attribute", "group_metrics", ["run_id", "attribute"], unique=False)
