"""What one model did on each example: `Outcomes` (prediction, correctness, float64 cross-entropy and the
distance-to-boundary inputs p_y, 1 − Σp², logit margin) and `evaluate`, which computes them batch by batch.
Definitions: docs/METHODS.md §2."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from worker.engine.errors import EngineError


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
        return {
            "pred": self.pred,
            "correct": self.correct,
            "loss": self.loss,
            "label": self.label,
            "p_true": self.p_true,
            "gini": self.gini,
            "margin": self.margin,
        }

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
        return Outcomes(
            pred=empty_i,
            correct=np.empty(0, bool),
            loss=empty_f,
            label=empty_i,
            p_true=empty_f,
            gini=empty_f,
            margin=empty_f,
        )
    input_dtype = _input_dtype(model)
    blocks, pending, pending_start = [], [], 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                # np.array copies the slice: a writable float32 batch even when x is a read-only memmap.
                batch = torch.from_numpy(np.array(x[start : start + batch_size], dtype=np.float32))
                # Kept as a float64 copy: holding the model's own output buffers across batches slowed the
                # forward pass by ~4% here (measured), and float64 is what the losses need anyway.
                pending.append(model(batch.to(device=device, dtype=input_dtype)).double())
                num_classes = int(pending[-1].shape[1])
                rows = start + len(batch) - pending_start
                if rows >= POSTPROCESS_ROWS or start + batch_size >= len(x):
                    blocks.append(
                        _per_example(torch.cat(pending), labels[pending_start : pending_start + rows], pending_start)
                    )
                    pending, pending_start = [], pending_start + rows
    finally:
        model.train(was_training)
    pred, correct, loss, p_true, gini, margin = (np.concatenate(parts) for parts in zip(*blocks, strict=True))
    return Outcomes(
        pred=pred,
        correct=correct,
        loss=loss,
        label=labels,
        p_true=p_true,
        gini=gini,
        margin=margin,
        num_classes=num_classes,
    )


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
