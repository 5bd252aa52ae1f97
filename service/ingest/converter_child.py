"""The resource-limited child that reads an upload this process must not (a PyTorch checkpoint, an ONNX graph):
one runner and one reading of its outcome for both (`worker.convert_checkpoint`, `worker.import_onnx`).

What is limited is what a hostile file can exhaust: resident memory (polled here, the child killed past its cap),
CPU time and the size of what it writes (rlimits the child sets itself, worker/child_limits.py), and wall-clock
time. Not address space: importing a CUDA build of torch maps ~3.2 GB of virtual memory before any file is read,
while what it keeps resident stays a few hundred MB."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from service.errors import InvalidInput, PayloadTooLarge

_log = logging.getLogger(__name__)
REFUSED, OUT_OF_MEMORY = 2, 3  # the children's exit codes (worker/child_limits.py)
_POLL_S = 0.02  # how often the child's resident memory is read
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Each child holds up to its memory cap; a few at once is plenty for uploads.
_CONVERSION_SLOTS = threading.BoundedSemaphore(2)


@dataclass(frozen=True)
class ConversionLimits:
    timeout_s: float = 120.0
    cpu_seconds: int = 60
    # The interpreter with torch imported, converting a small file, measured: peak resident 278 MiB for a checkpoint
    # and 449 MiB for an ONNX import (with onnx and onnxruntime) with the CPU build of torch 2.13 (address space 584
    # and 790 MiB); 637 MiB for a checkpoint with the CUDA build 2.14.1+cu130 (address space 3141 MiB).
    base_rss_bytes: int = 1024**3
    memory_per_file_byte: int = 3  # the loaded tensors, their serialised copy and slack

    def max_rss_bytes(self, file_bytes: int, per_file_byte: int | None = None) -> int:
        return self.base_rss_bytes + (per_file_byte or self.memory_per_file_byte) * file_bytes


@dataclass(frozen=True)
class ChildTask:
    """One kind of child, and how its failures read to a client."""

    module: str
    doing: str  # "reading the PyTorch checkpoint"
    subject: str  # "the PyTorch checkpoint"
    output_too_large: str  # "… exceeds the limit of {limit} bytes"
    unreadable: str  # when it failed for no reason it gave
    hint: str


@dataclass(frozen=True)
class ChildOutcome:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int
    over_memory: bool


def child_environment() -> dict[str, str]:
    """A minimal environment for a conversion child: no secrets (database URLs), one thread, this tree's code."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(_PROJECT_ROOT),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "LC_ALL": "C.UTF-8",
    }


def run_child(
    task: ChildTask,
    source: Path,
    output: Path,
    workdir: Path,
    *,
    max_rss: int,
    max_output_bytes: int,
    limits: ConversionLimits,
) -> ChildOutcome:
    """Run `task`'s module on `source` (writing `output`) in `workdir`, under the limits; InvalidInput past the
    wall-clock limit. Its output goes to files, so a chatty child never blocks on a full pipe."""
    command = [sys.executable, "-m", task.module, str(source), str(output)]
    command += ["--max-cpu-seconds", str(limits.cpu_seconds), "--max-output-bytes", str(max_output_bytes)]
    with _CONVERSION_SLOTS, open(workdir / "stdout", "w+b") as out, open(workdir / "stderr", "w+b") as err:
        child = subprocess.Popen(
            command, env=child_environment(), cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        try:
            peak, ended = _watch(child, max_rss, time.monotonic() + limits.timeout_s)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        _log.info("%s: peak resident memory %d MiB (%s)", task.module, peak // 2**20, ended)
        if ended == "time":
            limit = f"{limits.timeout_s:g} s"
            raise InvalidInput(f"{task.doing} took longer than {limit}, the server's limit. {task.hint}.")
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    return ChildOutcome(child.returncode, stdout, stderr, peak, over_memory=ended == "memory")


def _watch(child: subprocess.Popen, max_rss: int, deadline: float) -> tuple[int, str]:
    """(peak resident bytes seen, why the watch ended: "exited", "memory" (killed past max_rss) or "time")."""
    peak = 0
    try:
        process = psutil.Process(child.pid)
        while child.poll() is None:
            if time.monotonic() > deadline:
                return peak, "time"
            peak = max(peak, process.memory_info().rss)
            if peak > max_rss:
                child.kill()
                return peak, "memory"
            time.sleep(_POLL_S)
    except psutil.NoSuchProcess:
        pass  # it ended between two reads
    return peak, "exited"


def child_failure(
    task: ChildTask, outcome: ChildOutcome, max_rss: int, max_output_bytes: int, limits: ConversionLimits
) -> Exception:
    """What a failed child means, from its exit status and output."""
    lines = outcome.stdout.strip().splitlines()
    if outcome.returncode == REFUSED and lines:
        try:
            reason = json.loads(lines[-1])["error"]
        except (ValueError, KeyError, TypeError):
            reason = None
        if reason:
            return InvalidInput(f"{task.subject} cannot be used: {reason}. {task.hint}.")
    if outcome.returncode == -signal.SIGXFSZ:
        return PayloadTooLarge(task.output_too_large.format(limit=max_output_bytes))
    stderr = outcome.stderr
    if (
        outcome.over_memory
        or outcome.returncode in (OUT_OF_MEMORY, -signal.SIGXCPU, -signal.SIGKILL)
        or "MemoryError" in stderr
        or "std::bad_alloc" in stderr
    ):
        return InvalidInput(
            f"{task.doing} exceeded the server's limits ({limits.cpu_seconds} CPU seconds, "
            f"{max_rss // 2**20} MiB of memory). {task.hint}."
        )
    # The child missing a module is the server's fault, not the file's.
    if "ModuleNotFoundError" in stderr or "ImportError" in stderr:
        return RuntimeError(f"{task.module} cannot start: {stderr[-2000:]}")
    _log.warning("%s failed (exit %s): %s", task.module, outcome.returncode, stderr[-2000:])
    return InvalidInput(f"{task.unreadable}. {task.hint}.")
