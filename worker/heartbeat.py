"""A thread that keeps a running audit's heartbeat fresh while the pipeline works (a single evaluation of a
large model can outlast the sweeper's stale threshold between progress checkpoints) and enforces the
worker child's memory cap, which Celery's --max-memory-per-child only checks after a task has ended."""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time

from sqlalchemy import Update, update

from service.db import rows_matched, session_scope
from service.models import Audit, AuditStatus, utcnow

log = logging.getLogger(__name__)
MEMORY_CHECK_INTERVAL_S = 1.0


def resident_memory_mb() -> float:
    """This process's resident set now (Linux /proc), else its peak (ru_maxrss is KiB on Linux)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AttemptHeartbeat:
    """Used as `with AttemptHeartbeat(audit_id, attempt, ...) as heartbeat:` around the pipeline.

    Every write matches (status running, this attempt): once the sweeper has handed the audit to a new
    attempt, this one can no longer touch the row, and the task learns so at its next checkpoint."""

    def __init__(self, audit_id: str, attempt: int, *, interval_s: float, max_memory_mb: int) -> None:
        self.audit_id = audit_id
        self.attempt = attempt
        self.interval_s = interval_s
        self.max_memory_mb = max_memory_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{audit_id}", daemon=True)

    def __enter__(self) -> AttemptHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _owned_row(self) -> Update:
        return update(Audit).where(
            Audit.id == self.audit_id, Audit.status == AuditStatus.running, Audit.attempts == self.attempt
        )

    def _beat(self) -> bool:
        """False once the row is no longer this attempt's (ended, or re-queued after a stall)."""
        with session_scope() as session:
            return rows_matched(session, self._owned_row().values(heartbeat_at=utcnow())) == 1

    def _fail_over_memory_cap(self, used_mb: float) -> None:
        """Fail this attempt with the reason, then end the child: a thread cannot interrupt torch inside a C
        call, and killing the child frees the memory at once. Celery replaces the child; the redelivered
        message finds the audit no longer queued and does nothing."""
        error = (
            f"the audit used {used_mb:.0f} MiB of memory, above the worker's cap of {self.max_memory_mb} MiB "
            "(PRUNEAUDIT_WORKER_MAX_MEMORY_MB); use a smaller model, dataset or batch_size, or raise the cap"
        )
        try:
            with session_scope() as session:
                session.execute(
                    self._owned_row().values(
                        status=AuditStatus.failed, error=error, finished_at=utcnow(), heartbeat_at=utcnow()
                    )
                )
        finally:
            log.error("audit %s: %s; ending this worker child", self.audit_id, error)
            os.kill(os.getpid(), signal.SIGKILL)

    def _run(self) -> None:
        owned, next_beat = True, time.monotonic() + self.interval_s
        while not self._stop.wait(min(MEMORY_CHECK_INTERVAL_S, self.interval_s)):
            if self.max_memory_mb and (used_mb := resident_memory_mb()) > self.max_memory_mb:
                self._fail_over_memory_cap(used_mb)
            if owned and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.interval_s
                try:
                    owned = self._beat()
                except Exception:  # the database may be briefly away; the next beat tries again
                    log.warning("audit %s: heartbeat not written", self.audit_id, exc_info=True)
