"""A thread that keeps a running audit's or run's heartbeat fresh while the pipeline works (a single evaluation of
a large model can outlast the sweeper's stale threshold between progress checkpoints) and enforces the
worker child's memory cap, which Celery's --max-memory-per-child only checks after a task has ended."""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)
MEMORY_CHECK_INTERVAL_S = 1.0


def resident_memory_mb() -> float:
    """This process's resident set now (Linux /proc), else its peak (ru_maxrss is KiB on Linux)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Lease(Protocol):
    """An attempt's claim of its row (worker/leases.py: an audit's or a run's)."""

    @property
    def subject(self) -> str: ...  # "the audit", "the run": for the memory cap's message

    def beat(self) -> bool: ...  # heartbeat; False once the row is no longer this attempt's

    def fail(self, error: str) -> bool: ...  # this attempt fails, with the reason


class AttemptHeartbeat:
    """Used as `with AttemptHeartbeat(lease, ...):` around the pipeline.

    Every write matches (status running, this attempt): once the sweeper has handed the row to a new
    attempt, this one can no longer touch it, and the task learns so at its next checkpoint."""

    def __init__(self, lease: Lease, *, interval_s: float, max_memory_mb: int) -> None:
        self.lease = lease
        self.interval_s = interval_s
        self.max_memory_mb = max_memory_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> AttemptHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _fail_over_memory_cap(self, used_mb: float) -> None:
        """Fail this attempt with the reason, then end the child: a thread cannot interrupt torch inside a C
        call, and killing the child frees the memory at once. Celery replaces the child; the redelivered
        message finds the row no longer queued and does nothing."""
        error = (
            f"{self.lease.subject} used {used_mb:.0f} MiB of memory, above the worker's cap of {self.max_memory_mb} "
            "MiB (PRUNEAUDIT_WORKER_MAX_MEMORY_MB); use a smaller model, dataset or batch_size, or raise the cap"
        )
        try:
            self.lease.fail(error)
        finally:
            log.error("%s: %s; ending this worker child", self.lease, error)
            os.kill(os.getpid(), signal.SIGKILL)

    def _run(self) -> None:
        owned, next_beat = True, time.monotonic() + self.interval_s
        while not self._stop.wait(min(MEMORY_CHECK_INTERVAL_S, self.interval_s)):
            if self.max_memory_mb and (used_mb := resident_memory_mb()) > self.max_memory_mb:
                self._fail_over_memory_cap(used_mb)
            if owned and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.interval_s
                try:
                    owned = self.lease.beat()
                except Exception:  # the database may be briefly away; the next beat tries again
                    log.warning("%s: heartbeat not written", self.lease, exc_info=True)
