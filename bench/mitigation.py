"""What a constrained mitigation costs over plain fine-tuning, epoch for epoch: equalized_loss and ceag add
per-group losses (and ceag a replay buffer and a multiplier step) to every mini-batch, and Balancing Act
presents CEAG as costing about what plain training does. Same model, data, masks, optimizer and batches;
the three run interleaved, and the figure is the median of per-repeat ratios."""

from __future__ import annotations

import copy

import numpy as np
import torch

from bench.common import emit, interleaved_seconds, median_ratio
from worker.engine.architectures import build_model
from worker.engine.mitigation import GroupBaseline, mitigate
from worker.engine.outcomes import evaluate
from worker.engine.pruning import MagnitudePruner, apply_masks

ROWS, FEATURES, GROUPS, CLASSES = 20_000, 256, 10, 10
SPEC = {"name": "mlp", "in_features": FEATURES, "hidden": [1024, 512], "num_classes": CLASSES}
REPEATS = 5


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, FEATURES)).astype(np.float32)
    y = (x @ rng.standard_normal((FEATURES, CLASSES))).argmax(1)
    groups = rng.integers(0, GROUPS, ROWS)
    torch.manual_seed(0)
    dense = build_model(SPEC)
    masks = MagnitudePruner(scope="global", ignored_layers=[]).compute_masks(dense, 0.8)
    baseline = GroupBaseline.from_outcomes(evaluate(dense, x, y, batch_size=1024), groups, GROUPS)

    def one_epoch(name: str):
        def run() -> None:
            model = copy.deepcopy(dense)
            apply_masks(model, masks)
            mitigate(
                model,
                x,
                y,
                groups,
                GROUPS,
                name=name,
                epochs=1,
                lr=0.01,
                batch_size=128,
                masks=masks,
                baseline=baseline,
                dual_lr=0.0 if name == "finetune" else 0.01,
                seed=0,
            )

        return run

    names = ["finetune", "equalized_loss", "ceag"]
    times = interleaved_seconds([one_epoch(name) for name in names], REPEATS)
    details = {
        "rows": ROWS,
        "features": FEATURES,
        "groups": GROUPS,
        "model": SPEC,
        "parameters": sum(p.numel() for p in dense.parameters()),
        "sparsity": 0.8,
        "batch_size": 128,
        "repeats": REPEATS,
        "threads": torch.get_num_threads(),
        "median_epoch_s": {name: float(np.median(t)) for name, t in zip(names, times, strict=True)},
    }
    for name, seconds in zip(names[1:], times[1:], strict=True):
        ratio = median_ratio(seconds, times[0])
        emit(f"{name}_epoch_cost", ratio, "ratio to finetune", "<= 1.3", ratio <= 1.3, details)
