"""Per-group classification metrics against Fairlearn's MetricFrame on the same arrays, side by side in one run:
accuracy, selection rate, TPR, FPR and confusion counts for 1,000,000 binary predictions in 10 groups."""

from __future__ import annotations

import functools

import numpy as np

from bench.common import emit, median_seconds
from worker.engine.binary import binary_rates
from worker.engine.metrics import attribute_metrics, group_confusion
from worker.engine.outcomes import Outcomes

ROWS = 1_000_000
GROUPS = 10
REPEATS_OURS = 7
REPEATS_FAIRLEARN = 3


def _data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shares = np.geomspace(1, 0.02, GROUPS)  # unequal groups, from ~29% down to ~0.6% of the rows
    codes = rng.choice(GROUPS, size=ROWS, p=shares / shares.sum())
    label = rng.integers(0, 2, ROWS)
    flip = rng.random(ROWS) < 0.1 + 0.02 * codes  # accuracy varies by group
    pred = np.where(flip, 1 - label, label)
    return label, pred, codes


def ours(label: np.ndarray, pred: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    confusion = group_confusion(label, pred, codes, GROUPS, 2)
    rates = binary_rates(confusion)
    n = confusion.sum(axis=(1, 2))
    return {
        "accuracy": np.trace(confusion, axis1=1, axis2=2) / n,
        "selection_rate": rates.selection_rate,
        "tpr": rates.true_positive_rate,
        "fpr": rates.false_positive_rate,
        "confusion": confusion,
    }


def fairlearn_reference(label: np.ndarray, pred: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    import sklearn.metrics as skm
    from fairlearn.metrics import MetricFrame, false_positive_rate, selection_rate, true_positive_rate

    frame = MetricFrame(
        metrics={
            "accuracy": skm.accuracy_score,
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "confusion": functools.partial(skm.confusion_matrix, labels=[0, 1]),
        },
        y_true=label,
        y_pred=pred,
        sensitive_features=codes,
    ).by_group.sort_index()
    values = {name: frame[name].to_numpy(dtype=np.float64) for name in ("accuracy", "selection_rate", "tpr", "fpr")}
    return values | {"confusion": np.stack(frame["confusion"].to_list())}


def bench_group_metrics_vs_fairlearn() -> None:
    rng = np.random.default_rng(0)
    label, pred, codes = _data(rng)
    details = {
        "meaning": "Fairlearn MetricFrame time / ours for per-group accuracy, selection rate, TPR, FPR and "
        "2x2 confusion counts on the same arrays",
        "rows": ROWS,
        "groups": GROUPS,
        "group_sizes": np.bincount(codes, minlength=GROUPS).tolist(),
    }
    try:
        import fairlearn
    except ModuleNotFoundError:  # a test extra, not a runtime dependency
        emit("group_metrics_vs_fairlearn", 0.0, "x", ">= 50", False, details | {"error": "fairlearn not installed"})
        return
    ours_values = ours(label, pred, codes)
    reference_values = fairlearn_reference(label, pred, codes)  # also the reference's warm-up (~10 s a call)
    identical = all(np.array_equal(ours_values[k], reference_values[k]) for k in ours_values)
    ours_s = median_seconds(lambda: ours(label, pred, codes), REPEATS_OURS)
    reference_s = median_seconds(lambda: fairlearn_reference(label, pred, codes), REPEATS_FAIRLEARN, warmup=0)
    speedup = reference_s / ours_s

    # For scale: the full per-attribute entry point (both models: core metrics, flips, confusion, binary rates
    # and aggregates, no proxies, no bootstrap) on the same rows.
    dense = Outcomes(pred=label, correct=np.ones(ROWS, bool), loss=np.zeros(ROWS), label=label, num_classes=2)
    pruned = Outcomes(pred=pred, correct=pred == label, loss=np.zeros(ROWS), label=label, num_classes=2)
    names = [f"g{i}" for i in range(GROUPS)]
    attribute_s = median_seconds(lambda: attribute_metrics("g", dense, pruned, codes, names), REPEATS_OURS)
    emit(
        "group_metrics_vs_fairlearn",
        speedup,
        "x",
        ">= 50",
        identical and speedup >= 50,
        details
        | {
            "identical": identical,
            "ours_s": round(ours_s, 5),
            "reference_s": round(reference_s, 4),
            "repeats": {"ours": REPEATS_OURS, "fairlearn": REPEATS_FAIRLEARN},
            "attribute_metrics_both_models_s": round(attribute_s, 4),
            "fairlearn": fairlearn.__version__,
        },
    )


def main() -> None:
    bench_group_metrics_vs_fairlearn()


if __name__ == "__main__":
    main()
