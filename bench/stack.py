"""The embedded stack for benchmarks: `pruneaudit api` and worker processes started as in production (by
tests/integration/stack.py's starter, SQLite database and broker under a temp PRUNEAUDIT_VAR_DIR), their peak
RSS sampled with psutil, and a client that uploads, submits, follows progress over time and downloads the
runs' weights over HTTP."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from tests.integration.stack import Stack, start_process, start_stack

POLL_S = 0.2


class RssSampler:
    """Peak resident memory of each named process and its children (a Celery worker's prefork child
    included), summed per sample; sampled every `interval_s` in a daemon thread."""

    def __init__(self, processes: Mapping[str, subprocess.Popen], interval_s: float = 0.25) -> None:
        self._processes = processes  # read on every sample: a restarted worker is followed under its name
        self._peaks = dict.fromkeys(processes, 0.0)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree_mb(self, pid: int) -> float:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total / 2**20

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, process in list(self._processes.items()):
                self._peaks[name] = max(self._peaks.get(name, 0.0), self._tree_mb(process.pid))
            self._stop.wait(self._interval_s)

    def peaks_mb(self) -> dict[str, float]:
        return {f"{name}_peak_rss_mb": round(peak, 1) for name, peak in self._peaks.items()}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class BenchStack:
    """API plus `workers` worker processes (`--concurrency 1` each); `worker_env` goes to the workers only."""

    workers: int = 1
    worker_env: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    stack: Stack | None = None
    sampler: RssSampler | None = None
    var_dir: Path | None = None

    def __enter__(self) -> BenchStack:
        if "PRUNEAUDIT_DEVICE" in os.environ:  # bench/gpu.sh: the stack's processes start without PRUNEAUDIT_*
            self.settings = {"PRUNEAUDIT_DEVICE": os.environ["PRUNEAUDIT_DEVICE"], **self.settings}
        self.var_dir = Path(tempfile.mkdtemp(prefix="pruneaudit-bench-"))
        try:
            self.stack = start_stack(self.var_dir / "var", with_worker=False, settings=self.settings)
            self.stack.env.update(self.worker_env)  # the api already runs: only workers see these
            self._start_workers()
            self.sampler = RssSampler(self.stack.processes)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.stack is not None:
            children = []
            for process in self.stack.processes.values():
                with contextlib.suppress(psutil.NoSuchProcess):
                    children += psutil.Process(process.pid).children(recursive=True)
            self.stack.stop()
            for child in children:  # a prefork child whose parent was killed after the grace period
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        if self.var_dir is not None:
            shutil.rmtree(self.var_dir, ignore_errors=True)

    def _start_workers(self) -> None:
        assert self.stack is not None
        for number in range(1, self.workers + 1):
            start_process(self.stack, f"worker{number}", ["worker", "--concurrency", "1"])

    def restart_workers(self) -> None:
        """Kill every worker (its prefork child too) and start them again, e.g. after an audit timed out, so the
        work it would go on with until its next checkpoint shares the machine with nothing measured next."""
        assert self.stack is not None
        for name, process in self.stack.processes.items():
            if name.startswith("worker"):
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in psutil.Process(process.pid).children(recursive=True):
                        child.kill()
                process.kill()
                process.wait()
        self._start_workers()

    @property
    def env(self) -> dict:
        assert self.stack is not None
        return self.stack.env

    def client(self) -> httpx.Client:
        assert self.stack is not None
        return httpx.Client(base_url=self.stack.url, timeout=600, headers={"X-API-Key": self.stack.api_key})

    def peaks_mb(self) -> dict[str, float]:
        assert self.sampler is not None
        return self.sampler.peaks_mb()


def checked(response: httpx.Response) -> dict:
    if response.is_error:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} → {response.status_code}: {response.text}"
        )
    return response.json()


def upload_model(client: httpx.Client, weights: Path, architecture: dict) -> str:
    with weights.open("rb") as handle:
        files = {"weights": (weights.name, handle, "application/octet-stream")}
        return checked(client.post("/v1/models", files=files, data={"architecture": json.dumps(architecture)}))["id"]


def upload_npz(client: httpx.Client, arrays: Mapping[str, np.ndarray]) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files = {"file": ("bench.npz", buffer.getvalue(), "application/octet-stream")}
    return checked(client.post("/v1/datasets", files=files))["id"]


@dataclass(frozen=True)
class Followed:
    wall_s: float  # POST /v1/audits → status succeeded (or failed / timed out) seen
    audit: dict
    timeline: list[tuple[float, str]]  # (seconds since submit, progress message when first seen)
    timed_out: bool

    def phases(self) -> list[dict]:
        """Seconds between consecutive progress messages (each phase named by the message that ended it)."""
        marks = [(0.0, "submitted"), *self.timeline, (self.wall_s, self.audit["status"])]
        return [
            {"ended_by": message, "seconds": round(at - previous, 2)}
            for (previous, _), (at, message) in zip(marks, marks[1:], strict=False)
        ]


def run_audit(client: httpx.Client, spec: dict, timeout_s: float) -> Followed:
    started = time.monotonic()
    audit = checked(client.post("/v1/audits", json=spec))
    timeline: list[tuple[float, str]] = []
    while audit["status"] in ("queued", "running"):
        if time.monotonic() - started > timeout_s:
            return Followed(time.monotonic() - started, audit, timeline, True)
        time.sleep(POLL_S)
        audit = checked(client.get(f"/v1/audits/{audit['id']}"))
        message = audit["progress_message"] or audit["status"]
        if audit["status"] in ("queued", "running") and (not timeline or timeline[-1][1] != message):
            timeline.append((round(time.monotonic() - started, 2), message))
    return Followed(time.monotonic() - started, audit, timeline, False)


def report_of(client: httpx.Client, audit_id: str) -> dict:
    return checked(client.get(f"/v1/audits/{audit_id}/report"))


def run_seconds(report: dict) -> dict[str, float]:
    """Each run's own `seconds` from the JSON report (dense first), keyed '<label>@<ratio>'."""
    runs = [report["dense"], *report["runs"]]
    return {f"{run['label']}@{run['ratio']:g}": round(run["seconds"], 2) for run in runs}


def download_models(client: httpx.Client, report: dict, dense: Path, architecture: dict, into: Path) -> list[dict]:
    """The audit's models as the reference rebuilds them: the uploaded dense weights, then every run's
    pruned weights from its `weights_url` with its recipe's architecture."""
    models = [{"label": "dense", "architecture": architecture, "weights": str(dense)}]
    for position, run in enumerate(report["runs"], start=1):
        path = into / f"run-{position}.safetensors"
        path.write_bytes(client.get(run["weights_url"]).raise_for_status().content)
        models.append(
            {
                "label": f"{run['label']}@{run['ratio']:g}",
                "architecture": run["recipe"]["architecture"],
                "weights": str(path),
            }
        )
    return models
