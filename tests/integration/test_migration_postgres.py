"""Migration 0009 on PostgreSQL, the production database: the pre-redesign demo audit (tests/golden/
pre-0009.sqlite, revision 0008) copied row by row into a PostgreSQL database at 0008 upgrades to the report the
pre-redesign API served, and survives a downgrade and upgrade again."""

from __future__ import annotations

import json

import pytest
from alembic import command
from sqlalchemy import MetaData, create_engine

from service.migrate import alembic_config, upgrade_to_head
from tests.conftest import throwaway_postgres
from tests.integration.test_report_golden import GOLDEN, close
from tests.unit.test_migration_0009 import served_report, without_later_fields

pytestmark = pytest.mark.services


@pytest.fixture
def fresh_postgres():
    with throwaway_postgres("pruneaudit_migration") as url:
        yield url


def copy_rows(source_url: str, target_url: str) -> None:
    """Every row of every table (but Alembic's own), parents before children, replacing the target's (0008 seeds
    a default tenant)."""
    source, target = create_engine(source_url), create_engine(target_url)
    tables = MetaData()
    tables.reflect(source)
    target_tables = MetaData()
    target_tables.reflect(target)
    with source.connect() as reading, target.begin() as writing:
        for table in reversed(target_tables.sorted_tables):
            if table.name != "alembic_version":
                writing.execute(table.delete())
        for table in tables.sorted_tables:
            if table.name == "alembic_version":
                continue
            rows = [dict(row._mapping) for row in reading.execute(table.select())]
            if rows:
                writing.execute(target_tables.tables[table.name].insert(), rows)
    source.dispose()
    target.dispose()


def test_pre_redesign_rows_upgrade_on_postgres(fresh_postgres):
    command.upgrade(alembic_config(fresh_postgres), "0008")
    copy_rows(f"sqlite:///{GOLDEN / 'pre-0009.sqlite'}", fresh_postgres)
    upgrade_to_head(fresh_postgres)
    before = json.loads((GOLDEN / "pre-0009-demo-report.json").read_text(encoding="utf-8"))
    upgraded = without_later_fields(before, served_report(fresh_postgres))
    differences = close(before, upgraded, "report")
    assert not differences, "\n".join(differences[:40])

    command.downgrade(alembic_config(fresh_postgres), "0008")
    upgrade_to_head(fresh_postgres)
    differences = close(upgraded, without_later_fields(before, served_report(fresh_postgres)), "report")
    assert not differences, "\n".join(differences[:40])
