"""Fine-tuning a (pruned) classifier on numpy arrays, and gradual magnitude pruning (GMP) with the
cubic schedule of Zhu & Gupta 2017 (docs/METHODS.md §14) interleaved with that fine-tuning.

One-shot pruning followed by fine-tuning is: masks = pruner.compute_masks(model, ratio);
`finetune(model, x, y, ..., masks=masks)`, which applies the masks and keeps them through every
optimizer step. `gradual_magnitude_prune(..., pruning_steps=0)` does the same with a magnitude pruner.

Training reads `x` one batch at a time (a memory-mapped .npy is never loaded whole), in an order
drawn from `seed`; a run is deterministic for a seed on the CPU. Dropout draws from a forked
torch RNG seeded from `seed`, so the caller's global RNG state is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn

from worker.engine.errors import EngineError
from worker.engine.pruning import MagnitudePruner, MaskKeeper, Masks, Scope

OptimizerName = Literal["sgd", "adam"]
# Called after each epoch with (epochs done so far, counted from 1; that epoch's mean training loss).
# It may raise (a cancelled audit) to stop training; the model keeps the weights it has then.
EpochCallback = Callable[[int, float], None]


def cubic_sparsity_schedule(initial: float, final: float, steps: int) -> list[float]:
    """Zhu & Gupta's s_t = s_f + (s_i − s_f)(1 − t/n)³ at t = 0, 1, …, n (n = `steps` pruning steps
    after the first, Δt = 1): n + 1 values from exactly `initial` to exactly `final`, monotone, and
    dense early and flat late (most of the pruning happens while the network still has capacity).
    `steps` = 0 is one-shot pruning: [final]."""
    for name, value in (("initial", initial), ("final", final)):
        if not 0.0 <= value < 1.0:
            raise EngineError(f"{name} sparsity must be in [0, 1), got {value}")
    if steps < 0:
        raise EngineError(f"pruning steps must be 0 (one-shot) or more, got {steps}")
    if steps == 0:
        return [final]
    # The ends are set, not computed: s_f + (s_i − s_f) can differ from s_i in the last bit.
    return [initial] + [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps)] + [final]


def finetune(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    optimizer: OptimizerName = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    masks: Mapping[str, torch.Tensor] | MaskKeeper | None = None,
    device: str | torch.device = "cpu",
    on_epoch: EpochCallback | None = None,
) -> list[float]:
    """Train `model` in place with cross-entropy for `epochs` passes over (x, y); return each
    epoch's mean training loss. With `masks` (bool, True = kept, or a `MaskKeeper`) the removed
    weights are zeroed first and after every optimizer step. Leaves the model in eval mode."""
    check_training(x, y, epochs=epochs, lr=lr, batch_size=batch_size)
    device = torch.device(device)
    model.to(device)
    keeper = mask_keeper(model, masks)
    trainer = Trainer(
        model,
        x,
        y,
        batch_size=batch_size,
        optimizer=make_optimizer(model, optimizer, lr, momentum, weight_decay),
        seed=seed,
        device=device,
        keeper=keeper,
    )
    with trainer.attached(), forked_rng(device, seed):
        losses = [trainer.epoch(epoch, on_epoch) for epoch in range(1, epochs + 1)]
    model.eval()
    return losses


def gradual_magnitude_prune(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    final_ratio: float,
    pruning_steps: int,
    epochs_per_step: int,
    scope: Scope,
    ignored_layers: Sequence[str] = (),
    layer_ratios: Mapping[str, float] | None = None,
    initial_ratio: float = 0.0,
    lr: float,
    batch_size: int = 128,
    optimizer: OptimizerName = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_epoch: EpochCallback | None = None,
) -> Masks:
    """GMP (Zhu & Gupta 2017; Balancing Act's procedure): for each sparsity s_t of
    `cubic_sparsity_schedule(initial_ratio, final_ratio, pruning_steps)`, re-rank the current weights
    by magnitude, mask to s_t (masks nest: removed weights stay removed), then fine-tune
    `epochs_per_step` epochs with the masks kept. (pruning_steps + 1) · epochs_per_step epochs in all,
    the last `epochs_per_step` at the final sparsity; one optimizer and one shuffling stream throughout
    (no rewinding). A layer in `layer_ratios` follows its own cubic from `initial_ratio` to its ratio.
    Returns the final masks (exactly `final_ratio` by the pruner's counting). `on_epoch` gets the
    epoch counted over the whole run."""
    schedule = cubic_sparsity_schedule(initial_ratio, final_ratio, pruning_steps)
    if initial_ratio > final_ratio:
        raise EngineError(
            f"gradual pruning goes up: the initial sparsity {initial_ratio} is above the final {final_ratio}"
        )
    layer_ratios = dict(layer_ratios or {})
    low = sorted(name for name, ratio in layer_ratios.items() if ratio < initial_ratio)
    if low:
        raise EngineError(f"layer ratios of {', '.join(low)} are below the initial sparsity {initial_ratio}")
    check_training(x, y, epochs=epochs_per_step, lr=lr, batch_size=batch_size)
    device = torch.device(device)
    model.to(device)
    keeper = MaskKeeper(model, {})
    trainer = Trainer(
        model,
        x,
        y,
        batch_size=batch_size,
        optimizer=make_optimizer(model, optimizer, lr, momentum, weight_decay),
        seed=seed,
        device=device,
        keeper=keeper,
    )
    masks: Masks | None = None
    epoch = 0
    with trainer.attached(), forked_rng(device, seed):
        for step, ratio in enumerate(schedule):
            progress = _schedule_progress(pruning_steps, step)
            step_layer_ratios = {
                name: r if progress == 1 else initial_ratio + (r - initial_ratio) * progress
                for name, r in layer_ratios.items()
            }
            pruner = MagnitudePruner(scope=scope, ignored_layers=ignored_layers, layer_ratios=step_layer_ratios)
            masks = pruner.compute_masks(model, ratio, previous=masks)
            keeper.update(masks)
            for _ in range(epochs_per_step):
                epoch += 1
                trainer.epoch(epoch, on_epoch)
    model.eval()
    assert masks is not None  # the schedule has at least one step
    return masks


def _schedule_progress(steps: int, step: int) -> float:
    """1 − (1 − t/n)³: how far step t is along the cubic, whatever s_i and s_f (1 when one-shot)."""
    return 1.0 if steps == 0 else 1 - (1 - step / steps) ** 3


def check_training(x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int) -> None:
    if len(x) != len(y):
        raise EngineError(f"training data disagree: {len(x)} rows of x but {len(y)} labels")
    if len(x) == 0:
        raise EngineError("the training dataset is empty")
    if epochs < 0:
        raise EngineError(f"epochs must be 0 or more, got {epochs}")
    if batch_size < 1:
        raise EngineError(f"batch size must be at least 1, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise EngineError(f"learning rate must be a positive number, got {lr}")


def mask_keeper(model: nn.Module, masks: Mapping[str, torch.Tensor] | MaskKeeper | None) -> MaskKeeper | None:
    if masks is None:
        return None
    if isinstance(masks, MaskKeeper):
        if masks.model is not model:
            raise EngineError("the MaskKeeper holds the masks of another model")
        masks.apply()
        return masks
    return MaskKeeper(model, masks)


def make_optimizer(
    model: nn.Module, name: OptimizerName, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        # Adam's L2 penalty as in torch.optim.Adam (coupled), the setting FairGRAPE fine-tunes with.
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    raise EngineError(f"optimizer must be 'sgd' or 'adam', not {name!r}")


@contextmanager
def forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# The loss of one mini-batch: (logits, labels, the batch's row indices into x) → scalar tensor.
Objective = Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]


class Trainer:
    """One optimizer and one shuffling stream over (x, y): `epoch()` is one seeded pass. The objective is
    cross-entropy unless given (the mitigations add their constraint terms to it)."""

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int,
        optimizer: torch.optim.Optimizer,
        seed: int,
        device: torch.device,
        keeper: MaskKeeper | None,
        objective: Objective | None = None,
    ) -> None:
        self.model, self.x, self.device, self.optimizer, self.keeper = model, x, device, optimizer, keeper
        self.y = np.asarray(y).astype(np.int64, copy=False)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        cross_entropy = nn.CrossEntropyLoss()
        self.objective = objective or (lambda logits, labels, _index: cross_entropy(logits, labels))

    @contextmanager
    def attached(self) -> Iterator[None]:
        handle = self.keeper.attach(self.optimizer) if self.keeper is not None else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def epoch(self, epoch: int, on_epoch: EpochCallback | None) -> float:
        self.model.train()
        total, seen = 0.0, 0
        for index in self._batches():
            # Sorted within a batch: a memory-mapped x is read in file order; the batch's mean loss is the same.
            index.sort()
            inputs = torch.from_numpy(np.asarray(self.x[index], dtype=np.float32)).to(self.device)
            labels = torch.from_numpy(self.y[index]).to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.objective(self.model(inputs), labels, index)
            loss.backward()
            self.optimizer.step()  # the MaskKeeper hook re-zeroes removed weights here
            value = float(loss.detach())
            if not math.isfinite(value):
                raise EngineError(
                    f"fine-tuning diverged: the training loss is {value} in epoch {epoch}; lower the learning rate"
                )
            total += value * len(index)
            seen += len(index)
        mean_loss = total / seen
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
        return mean_loss

    def _batches(self) -> list[np.ndarray]:
        order = self.rng.permutation(len(self.y))
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            # BatchNorm cannot train on a single example: fold a lone last example into the batch before.
            batches[-2:] = [np.concatenate(batches[-2:])]
        return batches
