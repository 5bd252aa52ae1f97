"""An unexpected exception in a task is stored for the client in words, with the ids to quote; the exception itself
(here a SQL statement with its parameters) goes to the worker's log only."""

from __future__ import annotations

import logging

from service.logs import request_id_var
from worker.tasks import task_outcome

AUDIT_ID = "0123456789abcdef0123456789abcdef"
INTERNALS = "(psycopg.DataError) PostgreSQL text fields cannot contain NUL [SQL: INSERT INTO runs (id) VALUES (%(id)s)]"


class RecordingLease:
    """Only what task_outcome touches of a lease: it records the failure it is given."""

    audit_id = AUDIT_ID
    subject = "the run"

    def __init__(self) -> None:
        self.failures: list[str] = []

    def fail(self, error: str) -> bool:
        self.failures.append(error)
        return False  # the audit goes on: nothing else is touched


def test_an_unexpected_error_is_stored_in_words_and_logged_in_full(caplog):
    lease = RecordingLease()
    token = request_id_var.set("req-42")
    try:
        with caplog.at_level(logging.ERROR, logger="worker.tasks"), task_outcome(lease, 60):  # type: ignore[arg-type]
            raise RuntimeError(INTERNALS)
    finally:
        request_id_var.reset(token)
    [stored] = lease.failures
    assert AUDIT_ID in stored and "req-42" in stored and "internal error" in stored
    assert "INSERT" not in stored and "DataError" not in stored
    assert "INSERT INTO runs" in caplog.text and "Traceback" in caplog.text
