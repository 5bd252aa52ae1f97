"""The per-group metrics of one attribute comparing a dense model with its pruned version, from their
`Outcomes`: accuracy drop Δa, excess accuracy gap ψa (Balancing Act), excessive loss R(a) and the loss fairness
violation ξ (Tran et al.); distance-to-boundary proxies, flips, confusion matrices, binary-task rates
(worker.engine.binary), small-group flags and bootstrap confidence intervals (worker.engine.statistics).
Definitions: docs/METHODS.md §3–§8.

Accuracies are fractions (ε = 0.01 is one percentage point), losses are mean cross-entropy in nats.
Every per-group quantity is a bincount over the group codes: no Python loop over examples. A value
that cannot be computed is None with its reason in an `undefined` dict, never NaN or infinity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from results.attributes import AttributeAggregates, AttributeMetrics
from results.groups import BinaryRates, BoundaryProxies, ConfidenceIntervals, Confusion, Flips, GroupResult
from results.runs import OverallMetrics
from worker.engine.binary import add_binary_rates
from worker.engine.errors import EngineError
from worker.engine.group_table import GROUP_FIELD_FAMILIES, GroupTable, floats
from worker.engine.groupings import Grouping, checked_codes, spread, too_few_groups
from worker.engine.outcomes import Outcomes
from worker.engine.statistics import bootstrap_group_intervals

DEFAULT_MIN_GROUP_SIZE = 30  # docs/METHODS.md §3: flag n_a < 30 as unreliable
DEFAULT_MAX_CONFUSION_CELLS = 1_000_000  # groups × classes² per model; beyond it the matrices are left out


def overall_metrics(dense: Outcomes, pruned: Outcomes) -> OverallMetrics:
    _check_same_examples(dense, pruned)
    if len(dense) == 0:
        raise EngineError("cannot compute metrics on an empty evaluation set")
    dense_accuracy, accuracy = float(dense.correct.mean()), float(pruned.correct.mean())
    dense_loss, loss = float(dense.loss.mean()), float(pruned.loss.mean())
    return OverallMetrics(
        n=len(dense),
        dense_accuracy=dense_accuracy,
        accuracy=accuracy,
        dense_loss=dense_loss,
        loss=loss,
        accuracy_drop=dense_accuracy - accuracy,
        excessive_loss=loss - dense_loss,
    )


def group_confusion(
    label: np.ndarray, pred: np.ndarray, codes: np.ndarray, n_groups: int, num_classes: int
) -> np.ndarray:
    """Confusion counts per group, shape (n_groups, C, C), rows = true class, columns = predicted; examples
    with code −1 are left out. One bincount over the examples."""
    has_group = codes >= 0
    if has_group.all():
        key = (codes * num_classes + label) * num_classes + pred
    else:
        key = (codes[has_group] * num_classes + label[has_group]) * num_classes + pred[has_group]
    cells = n_groups * num_classes * num_classes
    return np.bincount(key, minlength=cells).reshape(n_groups, num_classes, num_classes)


def attribute_metrics(
    attribute: str,
    dense: Outcomes,
    pruned: Outcomes,
    codes: np.ndarray,
    names: Sequence[str],
    *,
    num_classes: int | None = None,
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE,
    bootstrap_resamples: int = 0,
    seed: int = 0,
    max_confusion_cells: int = DEFAULT_MAX_CONFUSION_CELLS,
) -> AttributeMetrics:
    """Metrics per group of one attribute; `codes[i]` is example i's index into `names`, −1 when the
    example has no group. Groups without examples are left out; examples without a group count in n_missing
    and in the overall Δ, and are left out of the binary aggregates (as they would be of a Fairlearn frame).

    `num_classes` defaults to the outcomes' own (set by `evaluate`). `bootstrap_resamples` > 0 adds 95%
    bootstrap intervals (1000 is the usual number; 0 leaves them out: the intervals redraw every grouped
    example `bootstrap_resamples` times, which costs far more than the rest of this function)."""
    overall = overall_metrics(dense, pruned)
    codes = checked_codes(attribute, codes, len(dense), len(names))
    num_classes = _num_classes(dense, pruned, num_classes)
    if min_group_size < 0:
        raise EngineError(f"min_group_size must be at least 0, got {min_group_size}")
    if bootstrap_resamples < 0:
        raise EngineError(f"bootstrap_resamples must be at least 0, got {bootstrap_resamples}")
    grouping = Grouping(codes, len(names))
    core = _core_columns(grouping, dense, pruned, overall)
    group_names = [names[int(code)] for code in grouping.present]
    aggregates = _aggregates(attribute, group_names, core)

    table = GroupTable(group_names)
    _add_proxies(table, grouping, dense, pruned)
    _add_flips(table, grouping, dense, pruned)
    label, label_reason = _labels(dense, pruned, num_classes)
    confusions = _add_confusions(table, grouping, label, label_reason, dense, pruned, num_classes, max_confusion_cells)
    binary, binary_undefined, caveats = add_binary_rates(table, attribute, num_classes, confusions, label_reason)
    max_gap_ci, ci_undefined = _add_intervals(table, attribute, codes, dense, pruned, bootstrap_resamples, seed)
    small = grouping.sizes < min_group_size
    groups = [
        _group_result(table, i, core, int(grouping.sizes[i]), overall.n, bool(small[i])) for i in range(table.size)
    ]
    undefined = aggregates.pop("undefined") | binary_undefined | ci_undefined
    return AttributeMetrics(
        attribute=attribute,
        n_missing=grouping.n_missing,
        groups=groups,
        # Validated from one dict (the keyword arguments the constructor would get): `aggregates` and `binary`
        # are keyed by field name at run time, so their values cannot be matched to fields statically.
        aggregates=AttributeAggregates.model_validate(
            dict(
                **aggregates,
                **binary,
                max_excess_accuracy_gap_ci=max_gap_ci,
                num_classes=num_classes,
                min_group_size=min_group_size,
                small_groups=[name for name, is_small in zip(group_names, small, strict=True) if is_small],
                bootstrap_resamples=bootstrap_resamples,
                bootstrap_seed=seed,
            )
        ),
        undefined=undefined,
        caveats=caveats,
    )


def _core_columns(
    grouping: Grouping, dense: Outcomes, pruned: Outcomes, overall: OverallMetrics
) -> dict[str, np.ndarray]:
    """The group table's core figures, one array over the groups with examples each."""
    dense_accuracy, accuracy = grouping.mean(dense.correct), grouping.mean(pruned.correct)
    dense_loss, loss = grouping.mean(dense.loss), grouping.mean(pruned.loss)
    accuracy_drop = dense_accuracy - accuracy
    # Δ is over ALL examples, those without a group included, as in Balancing Act; so Σ_a w_a ψ_a = 0
    # only when the groups cover every example.
    return {
        "dense_accuracy": dense_accuracy,
        "accuracy": accuracy,
        "dense_loss": dense_loss,
        "loss": loss,
        "accuracy_drop": accuracy_drop,
        "excess_accuracy_gap": accuracy_drop - overall.accuracy_drop,
        "excessive_loss": loss - dense_loss,
    }


def _group_result(
    table: GroupTable, i: int, core: dict[str, np.ndarray], n: int, total: int, small: bool
) -> GroupResult:
    figures = {field: float(values[i]) for field, values in core.items()}  # the keys of _core_columns
    return GroupResult(
        group=table.group_names[i],
        n=n,
        share=n / total,
        dense_accuracy=figures["dense_accuracy"],
        accuracy=figures["accuracy"],
        dense_loss=figures["dense_loss"],
        loss=figures["loss"],
        accuracy_drop=figures["accuracy_drop"],
        excess_accuracy_gap=figures["excess_accuracy_gap"],
        excessive_loss=figures["excessive_loss"],
        small_group=small,
        confidence_intervals=ConfidenceIntervals(**table.section(i, ConfidenceIntervals)),
        boundary=BoundaryProxies(**table.section(i, BoundaryProxies)),
        flips=Flips(**table.section(i, Flips)),
        confusion=Confusion(**table.section(i, Confusion)),
        binary=BinaryRates(**table.section(i, BinaryRates)),
        undefined=table.undefined[i],
    )


def _add_proxies(table: GroupTable, grouping: Grouping, dense: Outcomes, pruned: Outcomes) -> None:
    if not all(o.p_true is not None and o.gini is not None and o.margin is not None for o in (dense, pruned)):
        table.leave_out("proxies", "the outcomes carry no probabilities or logit margins (not made by evaluate())")
        return
    for prefix, outcomes in (("dense_", dense), ("", pruned)):
        p, gini, margin = outcomes.p_true, outcomes.gini, outcomes.margin
        assert p is not None and gini is not None and margin is not None  # checked for both models above
        table.columns[f"{prefix}error_proxy"] = floats(1.0 - grouping.mean(p))
        table.columns[f"{prefix}boundary_proximity"] = floats(grouping.mean(p * (1.0 - p)))
        table.columns[f"{prefix}gini_impurity"] = floats(grouping.mean(gini))
        table.columns[f"{prefix}logit_margin"] = floats(grouping.mean(margin))


def _add_flips(table: GroupTable, grouping: Grouping, dense: Outcomes, pruned: Outcomes) -> None:
    for field, flags in (
        ("flips_correct_to_wrong", dense.correct & ~pruned.correct),
        ("flips_wrong_to_correct", ~dense.correct & pruned.correct),
        ("flips_any", dense.pred != pruned.pred),
    ):
        counts = grouping.count(flags)
        table.columns[field] = [int(v) for v in counts]
        table.columns[f"{field}_rate"] = floats(counts / grouping.sizes)


def _add_confusions(
    table: GroupTable,
    grouping: Grouping,
    label: np.ndarray | None,
    label_reason: str | None,
    dense: Outcomes,
    pruned: Outcomes,
    num_classes: int | None,
    max_cells: int,
) -> dict[str, np.ndarray]:
    """Confusion counts per model, keyed by field prefix ("dense_", ""); empty when they cannot be had."""
    if label is None:
        assert label_reason is not None, "_labels gives a reason whenever it gives no labels"
        table.leave_out("confusion", label_reason)
        return {}
    assert num_classes is not None, "_labels gives labels only when the number of classes is known"
    cells = table.size * num_classes**2
    if cells > max_cells:
        table.leave_out(
            "confusion",
            f"{table.size} groups × {num_classes}² classes = {cells} cells per model, over the limit of {max_cells}",
        )
        return {}
    codes = grouping.present_codes()
    confusions = {}
    for prefix, outcomes in (("dense_", dense), ("", pruned)):
        confusions[prefix] = group_confusion(label, outcomes.pred, codes, table.size, num_classes)
        table.columns[f"{prefix}confusion"] = confusions[prefix].tolist()
    return confusions


def _add_intervals(
    table: GroupTable,
    attribute: str,
    codes: np.ndarray,
    dense: Outcomes,
    pruned: Outcomes,
    resamples: int,
    seed: int,
) -> tuple[tuple[float, float] | None, dict[str, str]]:
    """Per-group bootstrap intervals into the table; returns the interval of max ψa (or None and its reason)."""
    if resamples == 0:
        reason = "bootstrap not requested (bootstrap_resamples=0)"
    elif table.size == 0:
        reason = too_few_groups(attribute, table.group_names, 1)
    else:
        intervals = bootstrap_group_intervals(
            dense.correct, pruned.correct, dense.loss, pruned.loss, codes, resamples=resamples, seed=seed
        )
        for field in GROUP_FIELD_FAMILIES["confidence_intervals"]:
            bounds = getattr(intervals, field.removesuffix("_ci"))
            table.columns[field] = [(float(low), float(high)) for low, high in bounds]
        low, high = intervals.max_excess_accuracy_gap
        return (float(low), float(high)), {}
    table.leave_out("confidence_intervals", reason)
    return None, {"max_excess_accuracy_gap_ci": reason}


def _num_classes(dense: Outcomes, pruned: Outcomes, num_classes: int | None) -> int | None:
    known = {o.num_classes for o in (dense, pruned) if o.num_classes is not None}
    if num_classes is not None:
        known.add(num_classes)
    if len(known) > 1:
        raise EngineError(f"the number of classes disagrees between the outcomes and the call: {sorted(known)}")
    if not known:
        return None
    resolved = known.pop()
    if resolved < 2:
        raise EngineError(f"a classifier needs at least 2 classes, got num_classes={resolved}")
    for which, outcomes in (("dense", dense), ("pruned", pruned)):
        if len(outcomes) and (outcomes.pred.min() < 0 or outcomes.pred.max() >= resolved):
            raise EngineError(f"{which} predictions must be class indices in [0, {resolved})")
    return resolved


def _labels(dense: Outcomes, pruned: Outcomes, num_classes: int | None) -> tuple[np.ndarray | None, str | None]:
    """The true labels: from the outcomes, or for a binary task worked out from pred and correct."""
    if num_classes is None:
        return None, "number of classes unknown (pass num_classes or use outcomes from evaluate())"
    if dense.label is not None and pruned.label is not None and not np.array_equal(dense.label, pruned.label):
        raise EngineError("dense and pruned outcomes carry different labels for the same examples")
    label = dense.label if dense.label is not None else pruned.label
    if label is None and num_classes == 2:
        label = np.where(dense.correct, dense.pred, 1 - dense.pred)
        if not np.array_equal(pruned.correct, pruned.pred == label):
            raise EngineError("dense and pruned outcomes imply different labels for the same examples")
    if label is None:
        return None, "the outcomes carry no labels (not made by evaluate())"
    if len(label) and (label.min() < 0 or label.max() >= num_classes):
        raise EngineError(f"labels must be class indices in [0, {num_classes})")
    return label, None


def _aggregates(attribute: str, group_names: list[str], core: dict[str, np.ndarray]) -> dict:
    """The AttributeMetrics aggregates over groups, None with a reason where too few groups exist."""
    dense_accuracy, accuracy, accuracy_drop = core["dense_accuracy"], core["accuracy"], core["accuracy_drop"]
    excess_accuracy_gap, excessive_loss = core["excess_accuracy_gap"], core["excessive_loss"]
    over_groups = {
        "max_excess_accuracy_gap": lambda: float(excess_accuracy_gap.max()),
        "worst_group_accuracy": lambda: float(accuracy.min()),
        "worst_group": lambda: group_names[int(accuracy.argmin())],
        "max_accuracy_drop": lambda: float(accuracy_drop.max()),
    }
    # A spread over a single group is vacuously 0; reporting None keeps a policy gate from reading it as fair.
    between_groups = {
        "loss_fairness_violation": lambda: spread(excessive_loss),
        "accuracy_fairness_violation": lambda: spread(accuracy),
        "dense_accuracy_fairness_violation": lambda: spread(dense_accuracy),
        "pairwise_disparity": lambda: spread(excess_accuracy_gap),
        "accuracy_drop_std": lambda: float(np.std(accuracy_drop, ddof=1)),
    }
    values: dict = {}
    undefined: dict[str, str] = {}
    for required, metrics in ((1, over_groups), (2, between_groups)):
        for metric, compute in metrics.items():
            if len(group_names) >= required:
                values[metric] = compute()
            else:
                values[metric] = None
                undefined[metric] = too_few_groups(attribute, group_names, required)
    return values | {"undefined": undefined}


def _check_same_examples(dense: Outcomes, pruned: Outcomes) -> None:
    if len(dense) != len(pruned):
        raise EngineError(f"dense and pruned outcomes cover different examples: {len(dense)} vs {len(pruned)}")
