"""Diagnostics benchmarks: exact per-group gradient norms against one plain forward+backward pass over
the same data, and the per-group cost of the Hutchinson trace at the default settings, measured side
by side in one process."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import emit, interleaved_seconds, median_ratio
from worker.engine.architectures import build_model
from worker.engine.curvature import group_curvature, hutchinson_trace
from worker.engine.gradients import group_gradients

ARCHITECTURE = {"name": "mlp", "in_features": 784, "hidden": [400, 200], "num_classes": 10}  # 396,210 parameters
ROWS = 20_000
BATCH = 256
GROUPS = 10
REPEATS = 5
PROBES = 32
MAX_EXAMPLES = 512
HESSIAN_TARGET_S = 1.0


def _data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Workers read datasets memory-mapped; both sides of each comparison read the same mapped file.
    path = Path(tempfile.mkdtemp()) / "x.npy"
    np.save(path, rng.standard_normal((ROWS, ARCHITECTURE["in_features"]), dtype=np.float32))
    return np.load(path, mmap_mode="r"), rng.integers(0, ARCHITECTURE["num_classes"], ROWS)


def _unequal_groups(rng: np.random.Generator, n_groups: int) -> np.ndarray:
    """Group codes with shares ∝ 1/(rank+1) (the largest group ~34%, the smallest ~3%), shuffled."""
    shares = 1.0 / np.arange(1, n_groups + 1)
    return rng.choice(n_groups, size=ROWS, p=shares / shares.sum())


def _plain_pass(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
    # The minimal training-style gradient loop: shuffled batches of the same size, one backward each.
    model.zero_grad()
    order = rng.permutation(len(y))
    for start in range(0, len(order), BATCH):
        index = np.sort(order[start : start + BATCH])  # sorted like ours, so memmap reads cost the same
        inputs = torch.from_numpy(np.asarray(x[index]))
        labels = torch.from_numpy(np.asarray(y[index], dtype=np.int64))
        F.cross_entropy(model(inputs), labels, reduction="sum").backward()


def bench_grad_norms_cost() -> None:
    rng = np.random.default_rng(0)
    model = build_model(ARCHITECTURE)
    x, y = _data(rng)
    groups = _unequal_groups(rng, GROUPS)
    race, sex = _unequal_groups(rng, 5), rng.integers(0, 2, ROWS)
    intersection = race * 2 + sex

    plain, ours, three = interleaved_seconds(
        [
            lambda: _plain_pass(model, x, y, rng),
            lambda: group_gradients(model, None, x, y, [groups], batch_size=BATCH),
            lambda: group_gradients(model, None, x, y, [race, sex, intersection], batch_size=BATCH),
        ],
        REPEATS,
    )
    ratio = median_ratio(ours, plain)
    plain_s, ours_s = statistics.median(plain), statistics.median(ours)
    emit(
        "grad_norms_cost",
        ratio,
        "ratio",
        "<= 1.5",
        ratio <= 1.5,
        {
            "meaning": f"exact gradient norms of the mean loss of {GROUPS} groups (group_gradients) time / one plain "
            "forward+backward pass over the same data (shuffled batches of the same size)",
            "model": ARCHITECTURE,
            "parameters": sum(p.numel() for p in model.parameters()),
            "rows": ROWS,
            "batch": BATCH,
            "group_sizes": np.bincount(groups).tolist(),
            "x": "float32 .npy, memory-mapped",
            "repeats": REPEATS,
            "plain_s": round(plain_s, 4),
            "ours_s": round(ours_s, 4),
            "value_is": "median over repeats of the per-repeat ratio, the three runs interleaved",
            "race_sex_intersection_17_groups_ratio": round(median_ratio(three, plain), 4),
            "threads": torch.get_num_threads(),
        },
    )


def bench_hessian_cost() -> None:
    rng = np.random.default_rng(1)
    model = build_model(ARCHITECTURE)
    x, y = _data(rng)
    groups = _unequal_groups(rng, 4)  # every group larger than the subsample cap
    members = np.flatnonzero(groups == 0)
    xg, yg = x[members], y[members]

    def gradient_of_subsample() -> None:
        # Reference unit: one plain gradient of the mean loss over the same 512 examples.
        index = members[:MAX_EXAMPLES]
        model.zero_grad()
        F.cross_entropy(
            model(torch.from_numpy(np.asarray(x[index]))), torch.from_numpy(np.asarray(y[index], dtype=np.int64))
        ).backward()

    reference, trace, both = interleaved_seconds(
        [
            gradient_of_subsample,
            lambda: hutchinson_trace(model, None, xg, yg, probes=PROBES, max_examples=MAX_EXAMPLES, seed=0),
            lambda: group_curvature(model, None, x, y, groups, 4, probes=PROBES, max_examples=MAX_EXAMPLES, seed=0),
        ],
        REPEATS,
    )
    reference_s, trace_s, both_s = statistics.median(reference), statistics.median(trace), statistics.median(both) / 4
    emit(
        "hessian_cost",
        trace_s,
        "s/group",
        f"<= {HESSIAN_TARGET_S}",
        trace_s <= HESSIAN_TARGET_S,
        {
            "meaning": f"seconds per group for the Hutchinson trace with {PROBES} Rademacher probes on a "
            f"{MAX_EXAMPLES}-example subsample (the defaults), Hessian-vector products by double backprop",
            "target_rationale": "an audit of 10 groups × (dense + 5 pruning ratios) then spends ≤ 1 minute on traces",
            "model": ARCHITECTURE,
            "parameters": sum(p.numel() for p in model.parameters()),
            "subsample": MAX_EXAMPLES,
            "probes": PROBES,
            "repeats": REPEATS,
            "plain_gradient_of_subsample_s": round(reference_s, 4),
            "trace_in_plain_gradients": round(median_ratio(trace, reference), 1),
            "trace_and_top_eigenvalue_s_per_group": round(both_s, 4),
            "threads": torch.get_num_threads(),
        },
    )


def main() -> None:
    torch.manual_seed(0)
    bench_grad_norms_cost()
    bench_hessian_cost()
