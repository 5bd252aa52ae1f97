"""The embedded SQLite broker under processes that start together. kombu's SQLAlchemy transport inserts its
queue row on first use, and two processes doing that at once fail on the UNIQUE name (seen in CI: the API's
first send failed while the worker declared the queue, and the audit stayed queued). `pruneaudit migrate` (and
`serve`) declare the queue before the API and workers start, so concurrent first publishers all succeed."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

from tests.integration.stack import REPO, stack_env

# Waits until a shared start instant, then publishes once: the race of the API and the worker on a fresh broker.
PUBLISH_AT = """
import sys, time
from service.queue import enqueue_audit
start = float(sys.argv[1])
while time.time() < start:
    pass
enqueue_audit(sys.argv[2])
"""


def test_migrate_declares_the_queue_so_concurrent_first_publishers_all_succeed(tmp_path):
    env = stack_env(tmp_path)
    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, cwd=REPO, check=True)
    with sqlite3.connect(tmp_path / "broker.sqlite") as broker:
        assert broker.execute("SELECT name FROM kombu_queue").fetchall() == [(env["PRUNEAUDIT_QUEUE_NAME"],)]

    start = time.time() + 5  # after every child has imported Celery
    publishers = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISH_AT, str(start), f"audit-{i}"], env=env, cwd=REPO, stderr=subprocess.PIPE
        )
        for i in range(4)
    ]
    errors = [publisher.communicate(timeout=60)[1].decode() for publisher in publishers]
    assert [publisher.returncode for publisher in publishers] == [0] * 4, errors
    with sqlite3.connect(tmp_path / "broker.sqlite") as broker:
        assert broker.execute("SELECT count(*) FROM kombu_message").fetchone() == (4,)
        assert broker.execute("SELECT count(*) FROM kombu_queue").fetchone() == (1,)
