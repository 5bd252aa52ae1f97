"""Migration 0010 gives every stored run a state: a database of revision 0009 (the golden pre-redesign audit,
upgraded) comes out with each run succeeded, attempted once, finished when its audit finished; down to 0009
and up again keeps the succeeded audit's runs, and removes the runs of an unfinished audit, which the older
code redoes from the start."""

from __future__ import annotations

import shutil

from alembic import command
from sqlalchemy import create_engine, text

from service.migrate import alembic_config, upgrade_to_head
from tests.integration.test_report_golden import GOLDEN


def rows(url: str, query: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(query))]
    finally:
        engine.dispose()


def test_existing_runs_come_out_succeeded_and_the_downgrade_keeps_them(tmp_path):
    database = tmp_path / "pruneaudit.sqlite"
    shutil.copy(GOLDEN / "pre-0009.sqlite", database)
    url = f"sqlite:///{database}"
    command.upgrade(alembic_config(url), "0009")
    upgrade_to_head(url)
    runs = rows(
        url,
        "SELECT r.status, r.attempts, r.finished_at = a.finished_at, r.updated_at IS NOT NULL, r.heartbeat_at, "
        "r.worker, a.runs_queued_at FROM runs r JOIN audits a ON a.id = r.audit_id",
    )
    assert len(runs) == 7
    assert set(runs) == {("succeeded", 1, 1, 1, None, None, None)}

    # An audit left unfinished at 0010: its queued run is dropped on the way down, the succeeded audit's are kept.
    engine = create_engine(url)
    with engine.begin() as connection:
        audit = connection.execute(text("SELECT * FROM audits")).mappings().one()
        connection.execute(
            text(
                "INSERT INTO audits (id, tenant_id, created_at, updated_at, status, model_id, dataset_id, spec, "
                "progress, attempts, cancel_requested) VALUES ('unfinished', :tenant, :now, :now, 'running', "
                ":model, :dataset, '{}', 0, 1, 0)"
            ),
            {
                "tenant": audit["tenant_id"],
                "now": audit["created_at"],
                "model": audit["model_id"],
                "dataset": audit["dataset_id"],
            },
        )
        connection.execute(
            text(
                "INSERT INTO runs (id, audit_id, position, label, method, ratio, mitigation, status, attempts, "
                "updated_at) VALUES ('queued-run', 'unfinished', 1, 'm', 'magnitude', 0.5, 'none', 'queued', 0, :now)"
            ),
            {"now": audit["created_at"]},
        )
    engine.dispose()
    command.downgrade(alembic_config(url), "0009")
    assert rows(url, "SELECT count(*) FROM runs WHERE audit_id = 'unfinished'") == [(0,)]
    assert rows(url, "SELECT count(*) FROM runs") == [(7,)]
    upgrade_to_head(url)
    assert set(rows(url, "SELECT status, attempts FROM runs")) == {("succeeded", 1)}
