"""Benchmark helpers: medians of repeats, side by side with a reference in the same run, one JSON line per figure."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved_seconds(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each function per repeat, run back to back within a repeat (after one warm-up
    round), so a change in machine load hits all of them alike; ratios are taken per repeat."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(bench: str, value: float, unit: str, target: str, ok: bool, details: dict) -> None:
    details = {**details, "peak_rss_mb": round(peak_rss_mb(), 1)}
    print(
        json.dumps(
            {"bench": bench, "value": round(value, 4), "unit": unit, "target": target, "ok": ok, "details": details}
        ),
        flush=True,
    )


SMOKE_ENV = "BENCH_SMOKE"


def smoke() -> bool:
    """Smoke size (`python -m bench --smoke`, `make bench SMOKE=1`): tiny sizes to check that a figure runs;
    its numbers mean nothing."""
    return os.environ.get(SMOKE_ENV) == "1"
