"""Engine benchmarks: per-group evaluation against a plain forward pass, and exact magnitude masks against
torch.nn.utils.prune's global_unstructured, measured side by side in one process."""

from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import prune

from bench.common import emit, interleaved_seconds, median_ratio, median_seconds
from worker.engine.architectures import build_model
from worker.engine.metrics import attribute_metrics
from worker.engine.outcomes import evaluate
from worker.engine.pruning import MagnitudePruner

ARCHITECTURE = {"name": "mlp", "in_features": 784, "hidden": [1024, 1024], "num_classes": 10}
ROWS = 20_000
BATCH = 1024
REPEATS = 9


def plain_forward(model: torch.nn.Module, x: np.ndarray) -> None:
    # The minimal eval loop over the same memory-mapped array: copy a batch in, forward, argmax.
    with torch.inference_mode():
        for start in range(0, len(x), BATCH):
            model(torch.from_numpy(np.array(x[start : start + BATCH]))).argmax(1)


def bench_eval_overhead() -> None:
    rng = np.random.default_rng(0)
    model = build_model(ARCHITECTURE)
    # Workers read datasets memory-mapped; both sides of the comparison read the same mapped file.
    path = Path(tempfile.mkdtemp()) / "x.npy"
    np.save(path, rng.standard_normal((ROWS, 784), dtype=np.float32))
    x = np.load(path, mmap_mode="r")
    y = rng.integers(0, 10, ROWS)
    attributes = {
        "race": (rng.integers(0, 5, ROWS), [str(i) for i in range(5)]),
        "sex": (rng.integers(0, 2, ROWS), ["F", "M"]),
    }
    dense = evaluate(model, x, y, batch_size=BATCH)

    def ours() -> None:
        pruned = evaluate(model, x, y, batch_size=BATCH)
        for name, (codes, names) in attributes.items():
            attribute_metrics(name, dense, pruned, codes, names)

    reference_times, our_times = interleaved_seconds([lambda: plain_forward(model, x), ours], REPEATS)
    ratio = median_ratio(reference_times, our_times)
    reference, measured = statistics.median(reference_times), statistics.median(our_times)
    emit(
        "eval_overhead",
        ratio,
        "ratio",
        ">= 0.90",
        ratio >= 0.90,
        {
            "meaning": "plain forward time / (per-example outcomes + per-group metrics for 2 attributes) time",
            "model": ARCHITECTURE,
            "parameters": sum(p.numel() for p in model.parameters()),
            "rows": ROWS,
            "batch": BATCH,
            "x": "float32 .npy, memory-mapped",
            "repeats": REPEATS,
            "reference_s": round(reference, 4),
            "ours_s": round(measured, 4),
            "threads": torch.get_num_threads(),
        },
    )


def bench_global_masks(ratio: float = 0.9) -> None:
    model = build_model(ARCHITECTURE)
    pruner = MagnitudePruner(scope="global")

    def reference() -> None:
        clone = copy.deepcopy(model)
        layers = [(m, "weight") for m in clone.modules() if isinstance(m, torch.nn.Linear)]
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=ratio)

    def ours() -> None:
        copy.deepcopy(model)  # same copy cost as the reference, so only the mask computation differs
        pruner.compute_masks(model, ratio)

    reference_s = median_seconds(reference, REPEATS)
    ours_s = median_seconds(ours, REPEATS)
    value = reference_s / ours_s
    emit(
        "global_magnitude_masks",
        value,
        "ratio",
        ">= 0.50",
        value >= 0.50,
        {
            "meaning": "torch.nn.utils.prune.global_unstructured(L1Unstructured) time / our exact-count masks time",
            "model": ARCHITECTURE,
            "parameters": sum(p.numel() for p in model.parameters()),
            "ratio": ratio,
            "repeats": REPEATS,
            "reference_s": round(reference_s, 4),
            "ours_s": round(ours_s, 4),
        },
    )


def main() -> None:
    torch.manual_seed(0)
    bench_eval_overhead()
    bench_global_masks()
