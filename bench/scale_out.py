"""`scale_out`: one audit on 2 worker processes against the same audit on 1, every worker with
`--concurrency 1` and one torch thread. Speedup = wall(1 worker) / wall(2 workers), each wall time POST
/v1/audits → succeeded seen; target ≥ 1.7. Two embedded stacks (API + SQLite database and broker each) run
side by side, one with 1 worker, one with 2; after a small warm-up audit on each (so every worker child has
imported torch), the two are interleaved per repeat, which one goes first alternating (in a run at these
sizes the audit that went first was ~5 s slower both times), and the value is the median per-repeat speedup.

One thread: the worker has no thread setting of its own; torch starts with OMP_NUM_THREADS threads and
`intra_op_threads` (worker/pipeline/runner.py) only ever lowers that (to 1 for models with little work per batch),
so OMP_NUM_THREADS=1 (and MKL_NUM_THREADS=1) in the workers' environment gives one thread; `details.
worker_threads` is read in a child with that environment under the worker's own rule.

Sizes: CIFAR ResNet-20 (272,474 parameters, seeded), 512 synthetic 3×32×32 examples, the class as the group
(10 groups), ratios 0.5, 0.7, 0.9 × magnitude-global and channel-l1-layerwise, curvature off (at one thread,
curvature on every group of every ResNet-20 model would take this figure past the time `make bench` has;
the figure is about spreading runs over workers), otherwise the default spec; 2 repeats. Smoke size
(BENCH_SMOKE=1): 64 examples, 1 repeat.

The dense baseline is one task and the six runs spread over the workers, so the speedup is bounded by that
serial part and each task's start (the SQLite broker is polled once a second)."""

from __future__ import annotations

import shutil
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.audit_resnet20 import ARCHITECTURE, cifar_like
from bench.audit_tabular import table
from bench.audits import SWEEP, seeded_model
from bench.common import emit, smoke
from bench.reference import worker_threads
from bench.stack import BenchStack, run_audit, upload_model, upload_npz

ROWS, SMOKE_ROWS = 512, 64
REPEATS, SMOKE_REPEATS = 2, 1
TARGET = 1.7
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPEC = {"group_by": ["class"], "pruning": SWEEP, "diagnostics": {"curvature": "off"}, "seed": 0}
WARMUP_ARCHITECTURE = {"name": "mlp", "in_features": 8, "hidden": [8], "num_classes": 2}

# What explains a miss (measured 2026-12-01 on an idle machine: 1.60, 49–56 s on one worker, 33 s on two).
WHY_MISSED = (
    "the dense baseline is one task that a second worker cannot share (a quarter of the one-worker time), and "
    "each run task starts by loading the stored inputs and baseline"
)


def prepare(stack: BenchStack, workdir: Path) -> dict:
    """Upload the ResNet-20 and its data, and warm every worker child up with a tiny 6-run audit."""
    with stack.client() as client:
        warm = workdir / "warm.safetensors"
        seeded_model(WARMUP_ARCHITECTURE, warm)
        small = table(200, 8)
        del small["group_sex"]
        warmup = {"group_by": ["race"], "pruning": SWEEP, "diagnostics": {"curvature": "off"}}
        ids = {"model_id": upload_model(client, warm, WARMUP_ARCHITECTURE), "dataset_id": upload_npz(client, small)}
        run_audit(client, {**ids, **warmup}, timeout_s=300)
        return {
            "model_id": upload_model(client, workdir / "resnet20.safetensors", ARCHITECTURE),
            "dataset_id": upload_npz(client, cifar_like(SMOKE_ROWS if smoke() else ROWS)),
        }


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    walls: dict[int, list[float]] = {1: [], 2: []}
    statuses: list[str] = []
    try:
        parameters = seeded_model(ARCHITECTURE, workdir / "resnet20.safetensors")
        with ExitStack() as stacks:
            stack = {n: stacks.enter_context(BenchStack(workers=n, worker_env=ONE_THREAD)) for n in (1, 2)}
            ids = {n: prepare(stack[n], workdir) for n in (1, 2)}
            for repeat in range(SMOKE_REPEATS if smoke() else REPEATS):
                for n in (1, 2) if repeat % 2 == 0 else (2, 1):  # ABBA: which runs first alternates
                    with stack[n].client() as client:
                        followed = run_audit(client, {**ids[n], **SPEC}, timeout_s=1800)
                    walls[n].append(followed.wall_s)
                    statuses.append(followed.audit["status"])
            threads = worker_threads(ARCHITECTURE, stack[1].env)
            peaks = {f"{n}_workers": stack[n].peaks_mb() for n in (1, 2)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    speedups = [one / two for one, two in zip(walls[1], walls[2], strict=True)]
    speedup = statistics.median(speedups)
    details = {
        "meaning": "wall(1 worker) / wall(2 workers) of the same audit, every worker --concurrency 1, 1 torch thread",
        "architecture": ARCHITECTURE,
        "parameters": parameters,
        "rows": SMOKE_ROWS if smoke() else ROWS,
        "groups": 10,
        "spec": SPEC,
        "runs": 7,
        "repeats": len(speedups),
        "value_is": "median over repeats of the per-repeat speedup, 1 and 2 workers interleaved, the order alternating",
        "one_worker_s": [round(s, 2) for s in walls[1]],
        "two_workers_s": [round(s, 2) for s in walls[2]],
        "worker_env": ONE_THREAD,
        "worker_threads": threads,
        "audit_statuses": statuses,
        "smoke": smoke(),
        "peak_rss_mb_by_stack": peaks,
    }
    ok = all(s == "succeeded" for s in statuses) and speedup >= TARGET
    if not ok:
        details["why_missed"] = WHY_MISSED
    emit("scale_out", speedup, "x", f">= {TARGET:g}", ok, details)
