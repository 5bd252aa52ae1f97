"""Engine and sessions. One session per request (or per task), committed at the boundary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import CursorResult, Delete, Engine, Update, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.settings import get_settings


def make_engine(url: str, pool_size: int, *, connect_timeout_s: int, statement_timeout_s: float | None) -> Engine:
    """`pool_size` connections, no overflow: as many as the API has request threads. A sync request holds its
    connection across several hops through FastAPI's thread pool; with fewer connections than threads, threads
    waiting for a connection starve the requests that hold one and wait for a thread (200 concurrent POSTs
    deadlocked on 5 + 10 connections). Connections open lazily, so a worker never opens more than it uses.

    Both timeouts end in OperationalError, which service/problems.py answers 503: a database that accepts
    connections but never answers must not hold a request. `statement_timeout_s` None: no limit (migrations);
    for SQLite it is the busy timeout, the longest a statement waits for another connection's lock."""
    pooling = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": 30}
    if url.startswith("sqlite"):
        busy_s = statement_timeout_s if statement_timeout_s is not None else 3600.0
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_s}, **pooling)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            # WAL lets the API read while a worker writes; foreign keys are off by default in SQLite.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
            cursor.close()

        return engine
    connect_args: dict[str, Any] = {"connect_timeout": connect_timeout_s}
    if statement_timeout_s is not None:
        connect_args["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **pooling)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(
        settings.resolved_database_url(),
        settings.api_threads,
        connect_timeout_s=settings.database_connect_timeout_s,
        statement_timeout_s=settings.database_statement_timeout_s,
    )


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


def get_session() -> Iterator[Session]:
    """FastAPI dependency: the request's session, committed when the handler returns normally."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def session_scope() -> Iterator[Session]:
    """The same boundary for code outside a request (worker tasks, CLI)."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def rows_matched(session: Session, statement: Update | Delete) -> int:
    """How many rows an UPDATE or DELETE without RETURNING matched. Session.execute returns a CursorResult for
    these, but is typed as returning a plain Result, which has no rowcount (sqlalchemy/sqlalchemy#9185)."""
    return cast("CursorResult[Any]", session.execute(statement)).rowcount
