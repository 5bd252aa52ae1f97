"""Per-example outcomes of a model, and the per-group metrics of SCIENCE.md §1 and §6 comparing a
dense model with its pruned version: accuracy drop Δa, excess accuracy gap ψa (Balancing Act),
excessive loss R(a) and the loss fairness violation ξ (Tran et al.).

Accuracies are fractions (ε = 0.01 is one percentage point), losses are mean cross-entropy in nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.errors import EngineError


@dataclass(frozen=True)
class Outcomes:
    """What one model did on each example, in dataset order."""

    pred: np.ndarray  # int64 predicted class
    correct: np.ndarray  # bool, pred == label
    loss: np.ndarray  # float64 cross-entropy

    def __post_init__(self) -> None:
        object.__setattr__(self, "pred", np.asarray(self.pred, dtype=np.int64))
        object.__setattr__(self, "correct", np.asarray(self.correct, dtype=bool))
        object.__setattr__(self, "loss", np.asarray(self.loss, dtype=np.float64))
        if not (self.pred.ndim == self.correct.ndim == self.loss.ndim == 1):
            raise EngineError("outcomes must be one value per example (1-D arrays)")
        if not (len(self.pred) == len(self.correct) == len(self.loss)):
            raise EngineError(
                f"outcomes disagree on the number of examples: {len(self.pred)} predictions, "
                f"{len(self.correct)} correctness flags, {len(self.loss)} losses"
            )
        # Every metric below is a mean of these; one NaN would make the whole report NaN.
        if not np.isfinite(self.loss).all():
            raise EngineError("outcomes contain NaN or infinite losses")

    def __len__(self) -> int:
        return len(self.loss)


def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> Outcomes:
    """Predictions, correctness and float64 cross-entropy of `model` (already on `device`) on every
    example, in eval mode; the model's train/eval mode is restored afterwards. `x` may be a
    read-only memmap: only one batch at a time is copied into memory."""
    if len(x) != len(y):
        raise EngineError(f"dataset has {len(x)} inputs but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise EngineError(f"labels must be integer class indices, got dtype {y.dtype}")
    if batch_size < 1:
        raise EngineError(f"batch size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = [
                _evaluate_batch(model, x, y, start, min(start + batch_size, len(x)), device)
                for start in range(0, len(x), batch_size)
            ]
    finally:
        model.train(was_training)
    if not batches:
        return Outcomes(pred=np.empty(0, np.int64), correct=np.empty(0, bool), loss=np.empty(0, np.float64))
    pred, correct, loss = (np.concatenate(parts) for parts in zip(*batches, strict=True))
    return Outcomes(pred=pred, correct=correct, loss=loss)


def _evaluate_batch(
    model: nn.Module, x: np.ndarray, y: np.ndarray, start: int, stop: int, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # np.array copies the slice: a writable float32 batch even when x is a read-only memmap.
    inputs = torch.from_numpy(np.array(x[start:stop], dtype=np.float32)).to(device=device, dtype=_input_dtype(model))
    labels = torch.from_numpy(np.array(y[start:stop], dtype=np.int64)).to(device)
    logits = model(inputs).double()  # float64 losses: group means of small differences stay exact
    n_classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise EngineError(
            f"labels must be class indices in [0, {n_classes}) for this model; examples {start}..{stop - 1} "
            f"contain labels from {int(labels.min())} to {int(labels.max())}"
        )
    if not torch.isfinite(logits).all():
        raise EngineError(
            f"the model produced NaN or infinite outputs on examples {start}..{stop - 1}; "
            "check the input scaling and the weights"
        )
    pred = logits.argmax(dim=1)
    loss = F.cross_entropy(logits, labels, reduction="none")
    return pred.cpu().numpy(), (pred == labels).cpu().numpy(), loss.cpu().numpy()


def _input_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@dataclass(frozen=True)
class OverallMetrics:
    n: int
    dense_accuracy: float
    accuracy: float
    dense_loss: float
    loss: float
    accuracy_drop: float  # Δ = Acc(θd) − Acc(θs); positive = pruning hurt
    excessive_loss: float  # J(θs) − J(θd)


@dataclass(frozen=True)
class GroupMetrics:
    group: str
    n: int
    share: float  # n_a / n over all evaluated examples, those without a group included
    dense_accuracy: float
    accuracy: float
    dense_loss: float
    loss: float
    accuracy_drop: float  # Δa = Acc_a(θd) − Acc_a(θs)
    excess_accuracy_gap: float  # ψa = Δa − Δ
    excessive_loss: float  # R(a) = J_a(θs) − J_a(θd)


@dataclass(frozen=True)
class AttributeMetrics:
    attribute: str
    groups: list[GroupMetrics]
    n_missing: int  # examples with no group for this attribute (code −1)
    loss_fairness_violation: float | None  # ξ = max R(a) − min R(a)
    accuracy_fairness_violation: float | None  # FV of the pruned model: max Acc_a − min Acc_a
    dense_accuracy_fairness_violation: float | None
    max_excess_accuracy_gap: float | None  # max ψa; feasible iff ≤ ε (Balancing Act)
    pairwise_disparity: float | None  # Ψ_PW = max ψa − min ψa
    accuracy_drop_std: float | None  # sample std (n−1) of Δa over groups
    worst_group_accuracy: float | None  # min Acc_a of the pruned model
    worst_group: str | None  # the group with that accuracy (lowest code on ties)
    max_accuracy_drop: float | None
    undefined: dict[str, str]  # the reason for every aggregate that is None


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


def attribute_metrics(
    attribute: str, dense: Outcomes, pruned: Outcomes, codes: np.ndarray, names: Sequence[str]
) -> AttributeMetrics:
    """Metrics per group of one attribute; `codes[i]` is example i's index into `names`, −1 when the
    example has no group. Groups without examples are left out."""
    overall = overall_metrics(dense, pruned)
    codes = _checked_codes(attribute, codes, len(dense), len(names))
    has_group = codes >= 0
    group_codes = codes[has_group]
    counts = np.bincount(group_codes, minlength=len(names))
    present = np.flatnonzero(counts)

    def group_mean(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(group_codes, weights=values[has_group].astype(np.float64), minlength=len(names))
        return sums[present] / counts[present]

    dense_accuracy, accuracy = group_mean(dense.correct), group_mean(pruned.correct)
    dense_loss, loss = group_mean(dense.loss), group_mean(pruned.loss)
    accuracy_drop = dense_accuracy - accuracy
    # Δ is over ALL examples, those without a group included, as in Balancing Act; so Σ_a w_a ψ_a = 0
    # only when the groups cover every example.
    excess_accuracy_gap = accuracy_drop - overall.accuracy_drop
    excessive_loss = loss - dense_loss
    group_names = [names[code] for code in present]
    groups = [
        GroupMetrics(
            group=group_names[i],
            n=int(counts[code]),
            share=int(counts[code]) / overall.n,
            dense_accuracy=float(dense_accuracy[i]),
            accuracy=float(accuracy[i]),
            dense_loss=float(dense_loss[i]),
            loss=float(loss[i]),
            accuracy_drop=float(accuracy_drop[i]),
            excess_accuracy_gap=float(excess_accuracy_gap[i]),
            excessive_loss=float(excessive_loss[i]),
        )
        for i, code in enumerate(present)
    ]
    return AttributeMetrics(
        attribute=attribute,
        groups=groups,
        n_missing=int((~has_group).sum()),
        **_aggregates(
            attribute, group_names, dense_accuracy, accuracy, accuracy_drop, excess_accuracy_gap, excessive_loss
        ),
    )


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
    if codes.min() < -1 or codes.max() >= n_names:
        raise EngineError(
            f"group codes for {attribute} must be in [-1, {n_names}), got {codes.min()} to {codes.max()}"
        )
    return codes.astype(np.int64, copy=False)
