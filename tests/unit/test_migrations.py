"""The Alembic head creates exactly the schema the ORM declares (no drift between models.py and migrations)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from service.migrate import upgrade_to_head
from service.models import Base


def test_migrations_match_the_orm(tmp_path):
    url = f"sqlite:///{tmp_path / 'schema.sqlite'}"
    upgrade_to_head(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert differences == []
    assert {"models", "datasets", "audits", "runs"} <= tables and "group_metrics" not in tables
