"""Migration 0009 folds the per-group rows into each run's typed result without losing a figure: a database
written by the pre-redesign code (tests/golden/pre-0009.sqlite: the demo audit of the golden inputs, made at
revision 0008) upgrades to a report equal, field by field, to the one the pre-redesign API served
(tests/golden/pre-0009-demo-report.json, what that code served); and down to 0008 and up again it gives the same
report. Fields that later report versions added come out empty (null or {}) for such an audit."""

from __future__ import annotations

import json
import shutil

from alembic import command
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service.audits import assemble_report, weights_path_url
from service.migrate import alembic_config, upgrade_to_head
from service.models import Audit
from tests.integration.test_report_golden import GOLDEN, close, masked


def served_report(url: str) -> dict:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            audit = session.scalars(select(Audit)).one()
            report = assemble_report(audit, weights_url=lambda run: "URL" + weights_path_url(run))
            ids = {audit.id: "AUDIT", audit.model_id: "MODEL", audit.dataset_id: "EVAL"}
            ids |= {run.id: f"RUN-{run.position}" for run in audit.runs}
            return masked(report.model_dump(mode="json"), ids)
    finally:
        engine.dispose()


def without_later_fields(before, after):
    """`after` without the keys `before` lacks whose value is empty: fields added since, which a stored result
    written before them cannot have."""
    if isinstance(before, dict) and isinstance(after, dict):
        return {
            key: without_later_fields(before.get(key), value)
            for key, value in after.items()
            if key in before or value not in (None, {})
        }
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [without_later_fields(b, a) for b, a in zip(before, after, strict=True)]
    return after


def test_pre_redesign_database_upgrades_to_the_same_report(tmp_path):
    database = tmp_path / "pruneaudit.sqlite"
    shutil.copy(GOLDEN / "pre-0009.sqlite", database)
    url = f"sqlite:///{database}"
    upgrade_to_head(url)
    before = json.loads((GOLDEN / "pre-0009-demo-report.json").read_text(encoding="utf-8"))
    upgraded = without_later_fields(before, served_report(url))
    differences = close(before, upgraded, "report")
    assert not differences, "\n".join(differences[:40])

    command.downgrade(alembic_config(url), "0008")
    upgrade_to_head(url)
    differences = close(upgraded, without_later_fields(before, served_report(url)), "report")
    assert not differences, "\n".join(differences[:40])
