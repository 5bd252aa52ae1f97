"""Run Alembic migrations programmatically, so `pruneaudit migrate` and `serve` need no alembic.ini."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.orm import Session

import migrations
from service.errors import DatabaseNotMigrated

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_to_head(database_url: str | None = None) -> None:
    command.upgrade(alembic_config(database_url), "head")


@lru_cache
def _revisions() -> tuple[str, frozenset[str]]:
    """This code's head revision, and every revision it knows."""
    script = ScriptDirectory.from_config(alembic_config())
    return script.get_current_head() or "", frozenset(r.revision for r in script.walk_revisions())


def check_schema_at_head(session: Session) -> None:
    """503 (DatabaseNotMigrated) unless the database is at this code's head, or at a revision it does not know (a
    newer one, migrated by a newer release during a rolling upgrade)."""
    head, known = _revisions()
    current = session.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
    if current is None or (current != head and current in known):
        raise DatabaseNotMigrated(
            f"the database schema is at revision {current or 'none'}, this release needs {head}; "
            "run `pruneaudit migrate`"
        )
