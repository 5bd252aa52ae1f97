"""Mitigations (docs/METHODS.md §16): train a pruned model further so that the harm pruning did to some groups
shrinks, on the training split, with the masks kept after every step.

- `finetune`: plain cross-entropy fine-tuning; the baseline the constrained methods are judged against
  (Balancing Act's NFT).
- `equalized_loss`: Tran et al. 2022, Eq. 8 — minimize J(θ) s.t. J_a(θ) = J(θ) for every group, by the
  Lagrangian dual framework of Fioretto et al. 2020: primal SGD on J + Σ_a λ_a·|J_a − J| over each
  mini-batch (groups present in it), dual ascent λ_a ← λ_a + s·(the epoch's mean |J_a − J|) after each
  epoch, λ(0) = 0. The violation is never negative, so λ only grows, and faster for groups further off.
- `ceag`: Balancing Act (ICLR 2024) — minimize J(θ) s.t. ψ_a(θ) ≤ ε. Accuracy has no gradient, so the
  model step uses the surrogate ψ̃_a = [J_a(θ) − J_a(θd)] − [J(θ) − J(θd)] (dense train losses computed
  once) and the multiplier step uses accuracies from a replay buffer of each group's last k per-sample
  0/1 outcomes. Per mini-batch, multipliers first, then the model (Cooper's alternating dual-primal
  order): λ_a ← max(0, λ_a + η·([A_a(θd) − A_a^buf] − [A(θd) − A^buf] − ε)) for every group whose buffer
  is full, then one SGD step on J + Σ_{a in batch} λ_a·ψ̃_a. A^buf weights the full buffers by each
  group's share of the training split, so that it estimates A(θ) as A(θd) is measured; BA's
  GroupCyclicBuffer weights them equally (each holds k), which with a 10% minority among two groups
  biases the minority's violation towards zero (seen on the constructed problem of the tests).

All three train through finetune.Trainer (one optimizer, a seeded shuffle, masks re-applied after each
step), so at equal epochs and learning rate they differ only in the objective.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.errors import EngineError
from worker.engine.finetune import (
    EpochCallback,
    OptimizerName,
    Trainer,
    check_training,
    forked_rng,
    make_optimizer,
    mask_keeper,
)
from worker.engine.outcomes import Outcomes
from worker.engine.pruning import MaskKeeper

MitigationName = Literal["finetune", "equalized_loss", "ceag"]
MITIGATIONS: tuple[str, ...] = ("finetune", "equalized_loss", "ceag")


@dataclass(frozen=True)
class GroupBaseline:
    """The dense model on the training split, per group code and overall: CEAG's fixed reference point.
    A group with no training example has NaN figures (it never appears in a batch)."""

    group_loss: np.ndarray
    group_accuracy: np.ndarray
    loss: float
    accuracy: float

    @classmethod
    def from_outcomes(cls, outcomes: Outcomes, codes: np.ndarray, n_groups: int) -> GroupBaseline:
        codes = check_codes(codes, len(outcomes.loss), n_groups)
        valid = codes >= 0
        counts = np.bincount(codes[valid], minlength=n_groups).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            group_loss = np.bincount(codes[valid], weights=outcomes.loss[valid], minlength=n_groups) / counts
            group_accuracy = np.bincount(codes[valid], weights=outcomes.correct[valid], minlength=n_groups) / counts
        return cls(group_loss, group_accuracy, float(outcomes.loss.mean()), float(outcomes.correct.mean()))


@dataclass(frozen=True)
class MitigationResult:
    name: str
    losses: list[float]  # each epoch's mean training objective (the Lagrangian for the constrained methods)
    multipliers: np.ndarray | None  # final λ per group code; None for plain fine-tuning
    multiplier_history: list[list[float]]  # λ after each epoch
    dual_steps: np.ndarray | None  # how many multiplier updates each group took part in
    seconds: float


def check_codes(codes: np.ndarray, n: int, n_groups: int) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.shape != (n,):
        raise EngineError(f"group codes must be one per training example ({n}); got shape {codes.shape}")
    codes = codes.astype(np.int64, copy=False)
    if n and (codes.min() < -1 or codes.max() >= n_groups):
        raise EngineError(f"group codes must lie in [-1, {n_groups}); got {codes.min()}..{codes.max()}")
    return codes


def group_means(values: torch.Tensor, codes: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `values` per group code (0 where a group is absent) and the counts; code −1 is in no group."""
    valid = codes >= 0
    sums = values.new_zeros(n_groups).index_add(0, codes[valid], values[valid])
    counts = torch.bincount(codes[valid], minlength=n_groups)
    return sums / counts.clamp(min=1), counts


class EqualizedLoss:
    """Tran et al.'s J + Σ_a λ_a |J_a − J| with per-epoch dual ascent (module docstring)."""

    def __init__(self, codes: np.ndarray, n_groups: int, dual_lr: float) -> None:
        self.codes, self.n_groups, self.dual_lr = codes, n_groups, dual_lr
        self.multipliers = np.zeros(n_groups)
        self.dual_steps = np.zeros(n_groups, dtype=np.int64)
        # The epoch's violations accumulate on the model's device: no host round trip per mini-batch.
        # (sum of violations, batches each group was present in) per group; None before the epoch's first batch.
        self._violations: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        losses = F.cross_entropy(logits, labels, reduction="none")
        overall = losses.mean()
        codes = torch.from_numpy(self.codes[index]).to(logits.device)
        group_loss, counts = group_means(losses, codes, self.n_groups)
        present = (counts > 0).to(losses.dtype)  # a group absent from the batch has no violation in it
        violation = (group_loss - overall).abs() * present
        if self._violations is None:
            self._violations = (
                torch.zeros(self.n_groups, dtype=torch.float64, device=logits.device),
                torch.zeros(self.n_groups, dtype=torch.float64, device=logits.device),
            )
        violation_sum, violation_batches = self._violations
        violation_sum.add_(violation.detach().double())
        violation_batches.add_(present.double())
        multipliers = torch.from_numpy(self.multipliers).to(device=logits.device, dtype=losses.dtype)
        return overall + (multipliers * violation).sum()

    def end_epoch(self) -> None:
        if self._violations is None:
            return
        violation_sum, violation_batches = self._violations
        batches = violation_batches.cpu().numpy()
        seen = batches > 0
        self.multipliers[seen] += self.dual_lr * violation_sum.cpu().numpy()[seen] / batches[seen]
        self.dual_steps[seen] += 1
        self._violations = None


class ReplayBuffers:
    """One FIFO of the last `size` 0/1 outcomes per group; a group's accuracy counts only once its FIFO is full."""

    def __init__(self, n_groups: int, size: int) -> None:
        if size < 1:
            raise EngineError(f"the replay buffer must hold at least one outcome per group, got {size}")
        self.size = size
        self.buffers: list[deque[float]] = [deque(maxlen=size) for _ in range(n_groups)]

    def add(self, correct: np.ndarray, codes: np.ndarray) -> None:
        for code in np.unique(codes[codes >= 0]):
            self.buffers[code].extend(correct[codes == code][-self.size :].tolist())

    def full_accuracies(self) -> tuple[np.ndarray, np.ndarray]:
        """(codes of the groups whose buffer is full, their buffered accuracies)."""
        full = np.array([code for code, buffer in enumerate(self.buffers) if len(buffer) == self.size], dtype=np.int64)
        return full, np.array([np.mean(self.buffers[code]) for code in full], dtype=np.float64)


class ConstrainedExcessAccuracyGap:
    """Balancing Act's CEAG: surrogate primal term, buffered-accuracy dual step first (module docstring)."""

    def __init__(
        self,
        codes: np.ndarray,
        n_groups: int,
        baseline: GroupBaseline,
        *,
        dual_lr: float,
        tolerance: float,
        buffer_size: int,
    ) -> None:
        self.codes, self.n_groups, self.baseline = codes, n_groups, baseline
        self.dual_lr, self.tolerance = dual_lr, tolerance
        self.buffers = ReplayBuffers(n_groups, buffer_size)
        self.group_weights = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)
        self.multipliers = np.zeros(n_groups)
        self.dual_steps = np.zeros(n_groups, dtype=np.int64)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        codes_np = self.codes[index]
        correct = (logits.detach().argmax(dim=1) == labels).cpu().numpy()
        self.buffers.add(correct, codes_np)
        self.dual_step()
        losses = F.cross_entropy(logits, labels, reduction="none")
        overall = losses.mean()
        codes = torch.from_numpy(codes_np).to(logits.device)
        group_loss, counts = group_means(losses, codes, self.n_groups)
        present = counts > 0
        dense_group_loss = torch.from_numpy(np.nan_to_num(self.baseline.group_loss)).to(logits.device, losses.dtype)
        surrogate = (group_loss - dense_group_loss) - (overall - self.baseline.loss)
        multipliers = torch.from_numpy(self.multipliers).to(device=logits.device, dtype=losses.dtype)
        return overall + (multipliers[present] * surrogate[present]).sum()

    def buffered_violations(self) -> tuple[np.ndarray, np.ndarray]:
        """(full groups, ψ_a^buf − ε for each): what the next multiplier step will add, over η."""
        full, accuracy = self.buffers.full_accuracies()
        if len(full) == 0:
            return full, accuracy
        overall = np.average(accuracy, weights=self.group_weights[full])
        gap = (self.baseline.group_accuracy[full] - accuracy) - (self.baseline.accuracy - overall)
        return full, gap - self.tolerance

    def dual_step(self) -> None:
        full, violation = self.buffered_violations()
        self.multipliers[full] = np.maximum(0.0, self.multipliers[full] + self.dual_lr * violation)
        self.dual_steps[full] += 1

    def end_epoch(self) -> None:
        """Multipliers move every mini-batch; nothing happens between epochs."""


Objective = Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]


def mitigate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    *,
    name: MitigationName,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    optimizer: OptimizerName = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    dual_lr: float = 0.0,
    tolerance: float = 0.01,
    buffer_size: int = 40,
    baseline: GroupBaseline | None = None,
    masks: dict[str, torch.Tensor] | MaskKeeper | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_epoch: EpochCallback | None = None,
) -> MitigationResult:
    """Train `model` in place on (x, y) with the named mitigation's objective, group codes `codes`
    (−1 = in no group) of `n_groups` groups, and the masks kept; leaves it in eval mode."""
    started = time.perf_counter()
    check_training(x, y, epochs=epochs, lr=lr, batch_size=batch_size)
    codes = check_codes(codes, len(y), n_groups)
    if dual_lr < 0 or tolerance < 0:
        raise EngineError("the dual step size and the tolerance must not be negative")
    objective = _objective(name, codes, n_groups, baseline, dual_lr, tolerance, buffer_size)
    device = torch.device(device)
    model.to(device)
    trainer = Trainer(
        model,
        x,
        y,
        batch_size=batch_size,
        optimizer=make_optimizer(model, optimizer, lr, momentum, weight_decay),
        seed=seed,
        device=device,
        keeper=mask_keeper(model, masks),
        objective=objective,
    )
    history: list[list[float]] = []

    def after_epoch(epoch: int, loss: float) -> None:
        if objective is not None:
            objective.end_epoch()
            history.append(objective.multipliers.tolist())
        if on_epoch is not None:
            on_epoch(epoch, loss)

    with trainer.attached(), forked_rng(device, seed):
        losses = [trainer.epoch(epoch, after_epoch) for epoch in range(1, epochs + 1)]
    model.eval()
    return MitigationResult(
        name=name,
        losses=losses,
        multipliers=None if objective is None else objective.multipliers.copy(),
        multiplier_history=history,
        dual_steps=None if objective is None else objective.dual_steps.copy(),
        seconds=time.perf_counter() - started,
    )


def _objective(
    name: MitigationName,
    codes: np.ndarray,
    n_groups: int,
    baseline: GroupBaseline | None,
    dual_lr: float,
    tolerance: float,
    buffer_size: int,
) -> EqualizedLoss | ConstrainedExcessAccuracyGap | None:
    """The training objective of the named mitigation (None = plain cross-entropy)."""
    if name == "finetune":
        return None
    if name == "equalized_loss":
        return EqualizedLoss(codes, n_groups, dual_lr)
    if name == "ceag":
        if baseline is None:
            raise EngineError("ceag needs the dense model's per-group training losses and accuracies (baseline)")
        return ConstrainedExcessAccuracyGap(
            codes, n_groups, baseline, dual_lr=dual_lr, tolerance=tolerance, buffer_size=buffer_size
        )
    raise EngineError(f"unknown mitigation {name!r}; choose one of {', '.join(MITIGATIONS)}")
