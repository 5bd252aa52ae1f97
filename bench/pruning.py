"""Pruning benchmarks, each measured side by side in one process in alternating rounds:

- structured_speedup: CPU latency of CIFAR ResNet-20 dense / channel-pruned by half (L1, Torch-Pruning);
- unstructured_speedup: the same for 90% global magnitude masks — no sparse kernels, so ≈ 1×, reported as is;
- gmp_cost: throughput of gradual magnitude pruning with fine-tuning against a bare training loop.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from arch.registry import input_shape
from bench.common import emit
from worker.engine.architectures import build_model
from worker.engine.finetune import gradual_magnitude_prune
from worker.engine.pruning import MagnitudePruner, apply_masks, default_dense_layers
from worker.engine.structured import ChannelPruner, measure_latency, model_cost

RESNET20 = {"name": "resnet20", "num_classes": 10, "image_size": 32}
LATENCY_BATCH = 64
LATENCY_REPEATS = 7
GMP_MODEL = {"name": "mlp", "in_features": 784, "hidden": [512, 256], "num_classes": 10}
GMP_ROWS = 8192
GMP_BATCH = 128
GMP_STEPS = 3  # (GMP_STEPS + 1) epochs on each side
GMP_REPEATS = 3


def _alternating_medians(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each timing function over `repeats` rounds, the functions alternating within a round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return {name: statistics.median(values) for name, values in times.items()}


def _latencies(dense: nn.Module, other: nn.Module, shape: list[int], batch: int) -> dict[str, float]:
    for model in (dense, other):  # warm-up
        measure_latency(model, shape, batch, repeats=1, warmup=1)
    return _alternating_medians(
        {
            "dense": lambda: measure_latency(dense, shape, batch, repeats=1, warmup=0),
            "pruned": lambda: measure_latency(other, shape, batch, repeats=1, warmup=0),
        },
        LATENCY_REPEATS,
    )


def bench_structured_speedup(ratio: float = 0.5) -> None:
    torch.manual_seed(0)
    dense = build_model(RESNET20)
    shape = input_shape(dense.spec)
    started = time.perf_counter()
    result = ChannelPruner("l1", "layerwise").prune(dense, ratio)
    prune_s = time.perf_counter() - started
    before, after = model_cost(dense, shape), model_cost(result.model, shape)
    figures = {batch: _latencies(dense, result.model, shape, batch) for batch in (1, LATENCY_BATCH)}
    main = figures[LATENCY_BATCH]
    speedup = main["dense"] / main["pruned"]
    emit(
        "structured_speedup",
        speedup,
        "x",
        ">= 2.0",
        speedup >= 2.0,
        {
            "meaning": f"CPU latency dense / pruned, batch {LATENCY_BATCH}, 1 thread: resnet20 {shape} with "
            f"{ratio:.0%} of the channels of every coupled group removed by L1 norm (Torch-Pruning)",
            "parameters": {"dense": before["parameters"], "pruned": after["parameters"]},
            "macs": {"dense": before["macs"], "pruned": after["macs"]},
            "file_bytes": {"dense": before["file_bytes"], "pruned": after["file_bytes"]},
            "latency_s": {f"batch_{b}": {k: round(v, 5) for k, v in f.items()} for b, f in figures.items()},
            "speedup": {f"batch_{b}": round(f["dense"] / f["pruned"], 3) for b, f in figures.items()},
            "prune_s": round(prune_s, 3),
            "repeats": LATENCY_REPEATS,
            "statistic": "median, alternating rounds",
            "threads": torch.get_num_threads(),
        },
    )


def bench_unstructured_speedup(ratio: float = 0.9) -> None:
    torch.manual_seed(0)
    dense = build_model(RESNET20)
    shape = input_shape(dense.spec)
    masked = copy.deepcopy(dense)
    pruner = MagnitudePruner(scope="global", ignored_layers=default_dense_layers(dense))
    apply_masks(masked, pruner.compute_masks(masked, ratio))
    times = _latencies(dense, masked, shape, LATENCY_BATCH)
    speedup = times["dense"] / times["pruned"]
    cost = model_cost(masked, shape)
    emit(
        "unstructured_speedup",
        speedup,
        "x",
        "reported as is (dense kernels: ~1x)",
        True,
        {
            "meaning": f"CPU latency dense / {ratio:.0%} global magnitude masks (first conv, fc dense), batch "
            f"{LATENCY_BATCH}, 1 thread: zeros are still multiplied",
            "parameters": cost["parameters"],
            "nonzero_parameters": cost["nonzero_parameters"],
            "macs": cost["macs"],
            "latency_s": {k: round(v, 5) for k, v in times.items()},
            "repeats": LATENCY_REPEATS,
            "threads": torch.get_num_threads(),
        },
    )


def _bare_training(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    """The minimal loop: shuffle, copy a batch in, forward, backward, SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(order), GMP_BATCH):
            index = order[start : start + GMP_BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(torch.from_numpy(x[index])), torch.from_numpy(y[index]))
            loss.backward()
            optimizer.step()


def bench_gmp_cost(final_ratio: float = 0.9) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((GMP_ROWS, 784), dtype=np.float32)
    y = rng.integers(0, 10, GMP_ROWS).astype(np.int64)
    torch.manual_seed(0)
    initial = build_model(GMP_MODEL)
    epochs = GMP_STEPS + 1

    def bare() -> float:
        model = copy.deepcopy(initial)
        started = time.perf_counter()
        _bare_training(model, x, y, epochs)
        return time.perf_counter() - started

    def gmp() -> float:
        model = copy.deepcopy(initial)
        started = time.perf_counter()
        gradual_magnitude_prune(
            model,
            x,
            y,
            final_ratio=final_ratio,
            pruning_steps=GMP_STEPS,
            epochs_per_step=1,
            scope="layerwise",
            ignored_layers=default_dense_layers(model),
            lr=0.01,
            batch_size=GMP_BATCH,
            optimizer="sgd",
            momentum=0.9,
        )
        return time.perf_counter() - started

    bare(), gmp()  # warm-up
    times = _alternating_medians({"bare": bare, "gmp": gmp}, GMP_REPEATS)
    examples = GMP_ROWS * epochs
    value = (examples / times["gmp"]) / (examples / times["bare"])
    emit(
        "gmp_cost",
        value,
        "ratio",
        ">= 0.85",
        value >= 0.85,
        {
            "meaning": "examples/s of gradual magnitude pruning + fine-tuning (cubic schedule, masks re-applied after "
            "every step) / examples/s of a bare SGD loop, same model, data, batches and epochs",
            "model": GMP_MODEL,
            "rows": GMP_ROWS,
            "batch": GMP_BATCH,
            "epochs": epochs,
            "pruning_steps": GMP_STEPS,
            "final_ratio": final_ratio,
            "examples_per_s": {k: round(examples / v, 1) for k, v in times.items()},
            "seconds": {k: round(v, 3) for k, v in times.items()},
            "repeats": GMP_REPEATS,
            "threads": torch.get_num_threads(),
        },
    )


def main() -> None:
    # Every figure at one intra-op thread: on a machine other processes load, OpenMP threads waiting on
    # each other slow a small forward by up to 100× at random, and a ratio of such times means nothing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench_structured_speedup()
        bench_unstructured_speedup()
        bench_gmp_cost()
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
