"""Per-example outcomes of a model, and the per-group metrics of SCIENCE.md §1 and §6 comparing a
dense model with its pruned version: accuracy drop Δa, excess accuracy gap ψa (Balancing Act),
excessive loss R(a) and the loss fairness violation ξ (Tran et al.); distance-to-boundary proxies,
flips, confusion matrices, binary-task rates (Fairlearn's definitions), small-group flags and
bootstrap confidence intervals (worker.engine.statistics).

Accuracies are fractions (ε = 0.01 is one percentage point), losses are mean cross-entropy in nats.
Every per-group quantity is a bincount over the group codes: no Python loop over examples. A value
that cannot be computed is None with its reason in an `undefined` dict, never NaN or infinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from results.attributes import AttributeAggregates, AttributeMetrics
from results.groups import BinaryRates, BoundaryProxies, ConfidenceIntervals, Confusion, Flips, GroupResult
from results.runs import OverallMetrics
from worker.engine.errors import EngineError
from worker.engine.statistics import bootstrap_group_intervals

DEFAULT_MIN_GROUP_SIZE = 30  # SCIENCE.md §6: flag n_a < 30 as unreliable
DEFAULT_MAX_CONFUSION_CELLS = 1_000_000  # groups × classes² per model; beyond it the matrices are left out
POSITIVE_CLASS = 1  # binary tasks: class index 1 is the positive label (Fairlearn's default pos_label)


@dataclass(frozen=True)
class Outcomes:
    """What one model did on each example, in dataset order. `evaluate` fills every field; the optional
    ones may be left out by hand-made outcomes, and the metrics that need them are then None with a reason."""

    pred: np.ndarray  # int64 predicted class
    correct: np.ndarray  # bool, pred == label
    loss: np.ndarray  # float64 cross-entropy
    label: np.ndarray | None = None  # int64 true class
    p_true: np.ndarray | None = None  # float64 softmax probability of the true class, p_y
    gini: np.ndarray | None = None  # float64 1 − Σ_c p_c²
    margin: np.ndarray | None = None  # float64 logit margin z_y − max_{c≠y} z_c (negative = misclassified)
    num_classes: int | None = None  # outputs of the model

    def __post_init__(self) -> None:
        object.__setattr__(self, "pred", np.asarray(self.pred, dtype=np.int64))
        object.__setattr__(self, "correct", np.asarray(self.correct, dtype=bool))
        object.__setattr__(self, "loss", np.asarray(self.loss, dtype=np.float64))
        for name, dtype in (("label", np.int64), ("p_true", np.float64), ("gini", np.float64), ("margin", np.float64)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        arrays = {name: value for name, value in self._arrays().items() if value is not None}
        if any(value.ndim != 1 for value in arrays.values()):
            raise EngineError("outcomes must be one value per example (1-D arrays)")
        if len({len(value) for value in arrays.values()}) > 1:
            raise EngineError(
                "outcomes disagree on the number of examples: "
                + ", ".join(f"{len(value)} {name}" for name, value in arrays.items())
            )
        # Every metric below is a mean of these; one NaN would make the whole report NaN.
        if not np.isfinite(self.loss).all():
            raise EngineError("outcomes contain NaN or infinite losses")
        for name in ("p_true", "gini", "margin"):
            if name in arrays and not np.isfinite(arrays[name]).all():
                raise EngineError(f"outcomes contain NaN or infinite values of {name}")
        if self.num_classes is not None and self.num_classes < 2:
            raise EngineError(f"a classifier needs at least 2 classes, outcomes say {self.num_classes}")
        if self.label is not None and not np.array_equal(self.pred == self.label, self.correct):
            raise EngineError("outcomes disagree with themselves: `correct` is not `pred == label`")

    def _arrays(self) -> dict[str, np.ndarray | None]:
        return {"pred": self.pred, "correct": self.correct, "loss": self.loss, "label": self.label,
                "p_true": self.p_true, "gini": self.gini, "margin": self.margin}

    def __len__(self) -> int:
        return len(self.loss)


# Per-example figures are computed on blocks of this many rows of logits, not per forward batch: a
# dozen small tensor ops per batch cost more than the forward pass's margin allows (eval_overhead bench).
POSTPROCESS_ROWS = 65_536


def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> Outcomes:
    """Predictions, correctness, float64 cross-entropy and the boundary proxies (p_y, 1 − Σp², logit
    margin) of `model` (already on `device`) on every example, in eval mode; the model's train/eval mode
    is restored afterwards. `x` may be a read-only memmap: only one batch at a time is copied into memory."""
    if len(x) != len(y):
        raise EngineError(f"dataset has {len(x)} inputs but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise EngineError(f"labels must be integer class indices, got dtype {y.dtype}")
    if batch_size < 1:
        raise EngineError(f"batch size must be at least 1, got {batch_size}")
    labels = np.array(y, dtype=np.int64)
    if len(labels) == 0:
        empty_f, empty_i = np.empty(0, np.float64), np.empty(0, np.int64)
        return Outcomes(pred=empty_i, correct=np.empty(0, bool), loss=empty_f, label=empty_i,
                        p_true=empty_f, gini=empty_f, margin=empty_f)
    input_dtype = _input_dtype(model)
    blocks, pending, pending_start = [], [], 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                # np.array copies the slice: a writable float32 batch even when x is a read-only memmap.
                batch = torch.from_numpy(np.array(x[start:start + batch_size], dtype=np.float32))
                # Kept as a float64 copy: holding the model's own output buffers across batches slowed the
                # forward pass by ~4% here (measured), and float64 is what the losses need anyway.
                pending.append(model(batch.to(device=device, dtype=input_dtype)).double())
                num_classes = int(pending[-1].shape[1])
                rows = start + len(batch) - pending_start
                if rows >= POSTPROCESS_ROWS or start + batch_size >= len(x):
                    blocks.append(_per_example(torch.cat(pending), labels[pending_start:pending_start + rows],
                                               pending_start))
                    pending, pending_start = [], pending_start + rows
    finally:
        model.train(was_training)
    pred, correct, loss, p_true, gini, margin = (np.concatenate(parts) for parts in zip(*blocks, strict=True))
    return Outcomes(pred=pred, correct=correct, loss=loss, label=labels, p_true=p_true, gini=gini, margin=margin,
                    num_classes=num_classes)


def _per_example(logits: torch.Tensor, labels_np: np.ndarray, offset: int) -> tuple:
    """float64 logits (group means of small loss differences stay exact) → per-example figures."""
    n_classes = logits.shape[1]
    stop = offset + len(labels_np) - 1
    if n_classes < 2:
        raise EngineError(f"the model has {n_classes} output; a classifier needs at least 2 classes")
    if labels_np.min() < 0 or labels_np.max() >= n_classes:
        raise EngineError(
            f"labels must be class indices in [0, {n_classes}) for this model; examples {offset}..{stop} "
            f"contain labels from {int(labels_np.min())} to {int(labels_np.max())}"
        )
    if not torch.isfinite(logits).all():
        raise EngineError(
            f"the model produced NaN or infinite outputs on examples {offset}..{stop}; "
            "check the input scaling and the weights"
        )
    labels = torch.from_numpy(labels_np).to(logits.device)
    pred = logits.argmax(dim=1)
    column = labels[:, None]
    log_probs = torch.log_softmax(logits, dim=1)
    loss = -log_probs.gather(1, column).squeeze(1)  # = F.cross_entropy(logits, labels, reduction="none")
    probs = log_probs.exp()
    gini = 1.0 - (probs * probs).sum(dim=1)
    # The best other class: the true class's logit masked out with −inf (n_classes ≥ 2, so a finite one is left).
    others = logits.scatter(1, column, float("-inf")).amax(dim=1)
    margin = logits.gather(1, column).squeeze(1) - others
    p_true = torch.exp(-loss)
    return tuple(t.cpu().numpy() for t in (pred, pred == labels, loss, p_true, gini, margin))


def _input_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# Keys of a group's `undefined` that stand for a whole section of fields left None for one reason.
GROUP_FIELD_FAMILIES: dict[str, tuple[str, ...]] = {
    family: tuple(section.model_fields)
    for family, section in (("proxies", BoundaryProxies), ("confusion", Confusion), ("binary_rates", BinaryRates),
                            ("confidence_intervals", ConfidenceIntervals))
}


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


def group_confusion(label: np.ndarray, pred: np.ndarray, codes: np.ndarray, n_groups: int, num_classes: int) -> np.ndarray:
    """Confusion counts per group, shape (n_groups, C, C), rows = true class, columns = predicted; examples
    with code −1 are left out. One bincount over the examples."""
    has_group = codes >= 0
    if has_group.all():
        key = (codes * num_classes + label) * num_classes + pred
    else:
        key = (codes[has_group] * num_classes + label[has_group]) * num_classes + pred[has_group]
    cells = n_groups * num_classes * num_classes
    return np.bincount(key, minlength=cells).reshape(n_groups, num_classes, num_classes)


@dataclass(frozen=True)
class GroupRateArrays:
    """Per-group rates of a binary task from confusion counts (G, 2, 2); NaN marks an undefined rate
    (internal only: the group results turn it into None with a reason)."""

    selection_rate: np.ndarray
    true_positive_rate: np.ndarray
    false_positive_rate: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray


def binary_rates(confusion: np.ndarray) -> GroupRateArrays:
    positives = confusion[:, 1, :].sum(axis=1)
    negatives = confusion[:, 0, :].sum(axis=1)
    n = positives + negatives
    selected = confusion[:, :, POSITIVE_CLASS].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return GroupRateArrays(
            selection_rate=selected / n,
            true_positive_rate=np.where(positives > 0, confusion[:, 1, 1] / positives, np.nan),
            false_positive_rate=np.where(negatives > 0, confusion[:, 0, 1] / negatives, np.nan),
            positives=positives,
            negatives=negatives,
        )


def intersect(columns: Sequence[tuple[str, np.ndarray, Sequence[str]]]) -> tuple[str, np.ndarray, list[str]]:
    """Intersectional groups of several attributes: ("race", codes, names), ("sex", ...) → ("race&sex",
    codes, ["Black&F", ...]). A row missing any attribute (code −1) is missing in the intersection; only
    combinations that occur get a code, in sorted order of the attributes' codes (the first attribute
    varies slowest), so the result does not depend on row order."""
    if not columns:
        raise EngineError("intersect needs at least one attribute")
    n = len(columns[0][1])
    checked = [(name, _checked_codes(name, codes, n, len(names)), list(names)) for name, codes, names in columns]
    sizes = [max(len(names), 1) for _, _, names in checked]
    missing = np.zeros(n, dtype=bool)
    for _, codes, _ in checked:
        missing |= codes < 0
    cells = 1
    for size in sizes:
        cells *= size
    if cells < 2**62:
        # Mixed-radix key: its numeric order is the lexicographic order of the attribute codes.
        key = np.zeros(n, dtype=np.int64)
        for (_, codes, _), size in zip(checked, sizes, strict=True):
            key = key * size + np.maximum(codes, 0)
        valid_key = key[~missing]
        if cells <= max(4 * n, 1 << 20):
            seen = np.bincount(valid_key, minlength=cells) > 0
            combos = np.flatnonzero(seen)
            new_code = np.cumsum(seen) - 1
            inverse = new_code[valid_key]
        else:
            combos, inverse = np.unique(valid_key, return_inverse=True)
        digits = []
        rest = combos
        for size in reversed(sizes):
            digits.append(rest % size)
            rest = rest // size
        combo_codes = np.stack(digits[::-1], axis=1) if len(combos) else np.empty((0, len(sizes)), np.int64)
    else:  # too many combinations for one int64 key: unique rows (slower, same order)
        stacked = np.stack([codes for _, codes, _ in checked], axis=1)[~missing]
        combo_codes, inverse = np.unique(stacked, axis=0, return_inverse=True)
    out = np.full(n, -1, dtype=np.int64)
    out[~missing] = np.asarray(inverse).reshape(-1)
    names = ["&".join(checked[k][2][int(c)] for k, c in enumerate(row)) for row in combo_codes]
    return "&".join(name for name, _, _ in checked), out, names


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
    codes = _checked_codes(attribute, codes, len(dense), len(names))
    num_classes = _num_classes(dense, pruned, num_classes)
    if min_group_size < 0:
        raise EngineError(f"min_group_size must be at least 0, got {min_group_size}")
    if bootstrap_resamples < 0:
        raise EngineError(f"bootstrap_resamples must be at least 0, got {bootstrap_resamples}")
    grouping = _Grouping(codes, len(names))
    sizes = grouping.sizes
    dense_accuracy, accuracy = grouping.mean(dense.correct), grouping.mean(pruned.correct)
    dense_loss, loss = grouping.mean(dense.loss), grouping.mean(pruned.loss)
    accuracy_drop = dense_accuracy - accuracy
    # Δ is over ALL examples, those without a group included, as in Balancing Act; so Σ_a w_a ψ_a = 0
    # only when the groups cover every example.
    excess_accuracy_gap = accuracy_drop - overall.accuracy_drop
    excessive_loss = loss - dense_loss
    group_names = [names[code] for code in grouping.present]
    aggregates = _aggregates(
        attribute, group_names, dense_accuracy, accuracy, accuracy_drop, excess_accuracy_gap, excessive_loss
    )

    table = _DetailsTable(group_names)
    _add_proxies(table, grouping, dense, pruned)
    _add_flips(table, grouping, dense, pruned)
    label, label_reason = _labels(dense, pruned, num_classes)
    confusions = _add_confusions(table, grouping, label, label_reason, dense, pruned, num_classes, max_confusion_cells)
    binary, binary_undefined, caveats = _add_binary_rates(table, attribute, num_classes, confusions, label_reason)
    max_gap_ci, ci_undefined = _add_intervals(table, attribute, codes, dense, pruned, bootstrap_resamples, seed)
    small = sizes < min_group_size
    groups = []
    for i, name in enumerate(group_names):
        row = table.row(i)
        groups.append(GroupResult(
            group=name,
            n=int(sizes[i]),
            share=int(sizes[i]) / overall.n,
            dense_accuracy=float(dense_accuracy[i]),
            accuracy=float(accuracy[i]),
            dense_loss=float(dense_loss[i]),
            loss=float(loss[i]),
            accuracy_drop=float(accuracy_drop[i]),
            excess_accuracy_gap=float(excess_accuracy_gap[i]),
            excessive_loss=float(excessive_loss[i]),
            small_group=bool(small[i]),
            confidence_intervals=ConfidenceIntervals(**_fields(row, ConfidenceIntervals)),
            boundary=BoundaryProxies(**_fields(row, BoundaryProxies)),
            flips=Flips(**_fields(row, Flips)),
            confusion=Confusion(**_fields(row, Confusion)),
            binary=BinaryRates(**_fields(row, BinaryRates)),
            undefined=table.undefined[i],
        ))
    undefined = aggregates.pop("undefined") | binary_undefined | ci_undefined
    return AttributeMetrics(
        attribute=attribute,
        n_missing=grouping.n_missing,
        groups=groups,
        aggregates=AttributeAggregates(
            **aggregates, **binary, max_excess_accuracy_gap_ci=max_gap_ci, num_classes=num_classes,
            min_group_size=min_group_size,
            small_groups=[name for name, is_small in zip(group_names, small, strict=True) if is_small],
            bootstrap_resamples=bootstrap_resamples, bootstrap_seed=seed,
        ),
        undefined=undefined,
        caveats=caveats,
    )


def _fields(row: dict, section: type) -> dict:
    """The values of one section's fields in a table row."""
    return {name: row[name] for name in section.model_fields if name in row}


class _Grouping:
    """Group sums and counts of per-example values by bincount, over the groups that have examples."""

    def __init__(self, codes: np.ndarray, n_names: int) -> None:
        self.codes = codes
        self.has_group = codes >= 0
        self.all_grouped = bool(self.has_group.all())
        self.group_codes = codes if self.all_grouped else codes[self.has_group]
        self.n_names = n_names
        counts = np.bincount(self.group_codes, minlength=n_names)
        self.present = np.flatnonzero(counts)
        self.sizes = counts[self.present]
        self.n_missing = len(codes) - len(self.group_codes)

    def _grouped(self, values: np.ndarray) -> np.ndarray:
        return values if self.all_grouped else values[self.has_group]

    def mean(self, values: np.ndarray) -> np.ndarray:
        weights = self._grouped(values)
        weights = weights if weights.dtype == np.float64 else weights.astype(np.float64)
        return np.bincount(self.group_codes, weights=weights, minlength=self.n_names)[self.present] / self.sizes

    def count(self, flags: np.ndarray) -> np.ndarray:
        return np.bincount(self.group_codes[self._grouped(flags)], minlength=self.n_names)[self.present]

    def present_codes(self) -> np.ndarray:
        """Codes renumbered 0..len(present)−1 over the groups with examples; −1 stays −1."""
        index = np.zeros(self.n_names, dtype=np.int64)
        index[self.present] = np.arange(len(self.present))
        out = np.full(len(self.codes), -1, dtype=np.int64)
        out[self.has_group] = index[self.group_codes]
        return out


class _DetailsTable:
    """The GroupDetails fields as columns (one value per group), and the reasons for the None ones."""

    def __init__(self, group_names: list[str]) -> None:
        self.group_names = group_names
        self.size = len(group_names)
        self.columns: dict[str, list] = {}
        self.undefined: list[dict[str, str]] = [{} for _ in group_names]

    def leave_out(self, family: str, reason: str) -> None:
        for field in GROUP_FIELD_FAMILIES[family]:
            self.columns[field] = [None] * self.size
        for reasons in self.undefined:
            reasons[family] = reason

    def row(self, i: int) -> dict:
        return {field: values[i] for field, values in self.columns.items()}


def _add_proxies(table: _DetailsTable, grouping: _Grouping, dense: Outcomes, pruned: Outcomes) -> None:
    if not all(o.p_true is not None and o.gini is not None and o.margin is not None for o in (dense, pruned)):
        table.leave_out("proxies", "the outcomes carry no probabilities or logit margins (not made by evaluate())")
        return
    for prefix, outcomes in (("dense_", dense), ("", pruned)):
        p = outcomes.p_true
        table.columns[f"{prefix}error_proxy"] = _floats(1.0 - grouping.mean(p))
        table.columns[f"{prefix}boundary_proximity"] = _floats(grouping.mean(p * (1.0 - p)))
        table.columns[f"{prefix}gini_impurity"] = _floats(grouping.mean(outcomes.gini))
        table.columns[f"{prefix}logit_margin"] = _floats(grouping.mean(outcomes.margin))


def _add_flips(table: _DetailsTable, grouping: _Grouping, dense: Outcomes, pruned: Outcomes) -> None:
    for field, flags in (
        ("flips_correct_to_wrong", dense.correct & ~pruned.correct),
        ("flips_wrong_to_correct", ~dense.correct & pruned.correct),
        ("flips_any", dense.pred != pruned.pred),
    ):
        counts = grouping.count(flags)
        table.columns[field] = [int(v) for v in counts]
        table.columns[f"{field}_rate"] = _floats(counts / grouping.sizes)


def _add_confusions(
    table: _DetailsTable, grouping: _Grouping, label: np.ndarray | None, label_reason: str | None,
    dense: Outcomes, pruned: Outcomes, num_classes: int | None, max_cells: int,
) -> dict[str, np.ndarray]:
    """Confusion counts per model, keyed by field prefix ("dense_", ""); empty when they cannot be had."""
    if label is None:
        table.leave_out("confusion", label_reason)
        return {}
    cells = table.size * num_classes**2
    if cells > max_cells:
        table.leave_out("confusion", f"{table.size} groups × {num_classes}² classes = {cells} cells per model, "
                                     f"over the limit of {max_cells}")
        return {}
    codes = grouping.present_codes()
    confusions = {}
    for prefix, outcomes in (("dense_", dense), ("", pruned)):
        confusions[prefix] = group_confusion(label, outcomes.pred, codes, table.size, num_classes)
        table.columns[f"{prefix}confusion"] = confusions[prefix].tolist()
    return confusions


_BINARY_AGGREGATES = ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference")


def _add_binary_rates(
    table: _DetailsTable, attribute: str, num_classes: int | None, confusions: dict[str, np.ndarray],
    label_reason: str | None,
) -> tuple[dict[str, float | None], dict[str, str], dict[str, str]]:
    """Per-group selection rate, TPR and FPR of each model, and the attribute's binary aggregates:
    (values, reasons for the None ones, caveats)."""
    values: dict[str, float | None] = {}
    undefined: dict[str, str] = {}
    caveats: dict[str, str] = {}
    if num_classes != 2 or not confusions:
        if num_classes is None:
            reason = "binary metrics need a 2-class task; number of classes unknown (pass num_classes)"
        elif num_classes != 2:
            reason = f"binary metrics need a 2-class task; this one has {num_classes} classes"
        else:
            reason = label_reason or "the confusion counts were left out (too many groups)"
        table.leave_out("binary_rates", reason)
        for prefix in ("dense_", ""):
            for field in _BINARY_AGGREGATES:
                values[prefix + field] = None
                undefined[prefix + field] = reason
        return values, undefined, caveats
    group_names = table.group_names
    for prefix in ("dense_", ""):
        rates = binary_rates(confusions[prefix])
        table.columns[f"{prefix}selection_rate"] = _floats(rates.selection_rate)
        for field, rate, denominator, what in (
            ("true_positive_rate", rates.true_positive_rate, rates.positives, "positive (class 1)"),
            ("false_positive_rate", rates.false_positive_rate, rates.negatives, "negative (class 0)"),
        ):
            table.columns[prefix + field] = _floats(rate)
            for i in np.flatnonzero(denominator == 0):
                table.undefined[i][prefix + field] = f"group {group_names[i]} has no {what} examples"
        model_values, model_undefined, model_caveats = _binary_aggregates(attribute, group_names, rates)
        values |= {prefix + k: v for k, v in model_values.items()}
        undefined |= {prefix + k: v for k, v in model_undefined.items()}
        caveats |= {prefix + k: v for k, v in model_caveats.items()}
    return values, undefined, caveats


def _add_intervals(
    table: _DetailsTable, attribute: str, codes: np.ndarray, dense: Outcomes, pruned: Outcomes, resamples: int,
    seed: int,
) -> tuple[tuple[float, float] | None, dict[str, str]]:
    """Per-group bootstrap intervals into the table; returns the interval of max ψa (or None and its reason)."""
    if resamples == 0:
        reason = "bootstrap not requested (bootstrap_resamples=0)"
    elif table.size == 0:
        reason = _too_few_groups(attribute, table.group_names, 1)
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


def _floats(values: np.ndarray) -> list[float | None]:
    """Python floats, None where NaN (an undefined rate; its reason is recorded by the caller)."""
    return [None if v != v else float(v) for v in values.tolist()]


def _binary_aggregates(
    attribute: str, group_names: list[str], rates: GroupRateArrays
) -> tuple[dict[str, float | None], dict[str, str], dict[str, str]]:
    """Fairlearn's between-groups aggregates of one model: DP difference and ratio, EO difference (worst case).
    Where Fairlearn counts a group with no positives as TPR 0 (sklearn's zero-division rule), this leaves the
    group out of that rate's spread and says so in a caveat."""
    values: dict[str, float | None] = {}
    undefined: dict[str, str] = {}
    caveats: dict[str, str] = {}
    if len(group_names) < 2:
        reason = _too_few_groups(attribute, group_names, 2)
        return dict.fromkeys(_BINARY_AGGREGATES), dict.fromkeys(_BINARY_AGGREGATES, reason), {}
    selection = rates.selection_rate
    values["demographic_parity_difference"] = _spread(selection)
    if selection.max() > 0:
        values["demographic_parity_ratio"] = float(selection.min() / selection.max())
    else:
        values["demographic_parity_ratio"] = None
        undefined["demographic_parity_ratio"] = f"no group of {attribute} has any positive prediction (0/0)"
    spreads: dict[str, float] = {}
    problems: list[str] = []
    notes: list[str] = []
    for short, rate, what in (("TPR", rates.true_positive_rate, "positive"),
                              ("FPR", rates.false_positive_rate, "negative")):
        defined = ~np.isnan(rate)
        left_out = ", ".join(group_names[i] for i in np.flatnonzero(~defined))
        if defined.sum() < 2:
            problems.append(f"{short} is defined for fewer than 2 groups (groups without {what} examples: {left_out})")
        else:
            spreads[short] = _spread(rate[defined])
            if left_out:
                notes.append(f"{short} spread over {int(defined.sum())} of {len(group_names)} groups; left out "
                             f"(no {what} examples; Fairlearn would count their {short} as 0): {left_out}")
    if notes:
        caveats["equalized_odds_difference"] = "; ".join(notes)
    if problems:
        values["equalized_odds_difference"] = None
        undefined["equalized_odds_difference"] = "; ".join(problems)
    else:
        values["equalized_odds_difference"] = max(spreads.values())
    return values, undefined, caveats


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


def _aggregates(
    attribute: str,
    group_names: list[str],
    dense_accuracy: np.ndarray,
    accuracy: np.ndarray,
    accuracy_drop: np.ndarray,
    excess_accuracy_gap: np.ndarray,
    excessive_loss: np.ndarray,
) -> dict:
    """The AttributeMetrics aggregates over groups, None with a reason where too few groups exist."""
    over_groups = {
        "max_excess_accuracy_gap": lambda: float(excess_accuracy_gap.max()),
        "worst_group_accuracy": lambda: float(accuracy.min()),
        "worst_group": lambda: group_names[int(accuracy.argmin())],
        "max_accuracy_drop": lambda: float(accuracy_drop.max()),
    }
    # A spread over a single group is vacuously 0; reporting None keeps a policy gate from reading it as fair.
    between_groups = {
        "loss_fairness_violation": lambda: _spread(excessive_loss),
        "accuracy_fairness_violation": lambda: _spread(accuracy),
        "dense_accuracy_fairness_violation": lambda: _spread(dense_accuracy),
        "pairwise_disparity": lambda: _spread(excess_accuracy_gap),
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
                undefined[metric] = _too_few_groups(attribute, group_names, required)
    return values | {"undefined": undefined}


def _spread(values: np.ndarray) -> float:
    return float(values.max() - values.min())


def _too_few_groups(attribute: str, group_names: list[str], required: int) -> str:
    if not group_names:
        return f"no evaluated example has a group for attribute {attribute}"
    return f"needs at least {required} groups; attribute {attribute} has only {', '.join(group_names)}"


def _check_same_examples(dense: Outcomes, pruned: Outcomes) -> None:
    if len(dense) != len(pruned):
        raise EngineError(f"dense and pruned outcomes cover different examples: {len(dense)} vs {len(pruned)}")


def _checked_codes(attribute: str, codes: np.ndarray, n: int, n_names: int) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.shape != (n,) or not np.issubdtype(codes.dtype, np.integer):
        raise EngineError(f"group codes for {attribute} must be {n} integers, got shape {codes.shape} of {codes.dtype}")
    if n and (codes.min() < -1 or codes.max() >= n_names):
        raise EngineError(
            f"group codes for {attribute} must be in [-1, {n_names}), got {codes.min()} to {codes.max()}"
        )
    return codes.astype(np.int64, copy=False)
