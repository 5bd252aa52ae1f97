"""Directional derivatives of every group's mean loss J_a along δ = θs − θd: g_a·δ and δᵀH_aδ as means of
per-example derivatives over a capped, seeded subsample of each group (all of it when the group is small),
with their standard errors; δ itself and its norm; and Tran's second-order prediction of the excessive loss
R_hat(a) = g_a·δ + ½ δᵀH_aδ with its two Theorem-1 bound terms. Definitions: docs/METHODS.md §12.

Per-example derivatives come from forward-over-forward mode (a jvp of a jvp along t ↦ θ + tδ), one pass for
every group of every grouping at once, with no graph kept. Measured on this 2-core CPU (ResNet-20 CIFAR
layout, 512 images): 5.7 forward passes, against 3.7 for the exact per-group sums by double backprop over
cell-sorted batches; the per-example form pays for itself because a subsample of 256 per group (10 groups,
2,560 of 10,000 images) costs a quarter of the full pass and states its own error.

Conventions (params, masks, groupings, seeds, eval mode): worker/engine/_state.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from worker.engine._state import (
    Device,
    State,
    Tensors,
    aligned_directions,
    check_batch_size,
    check_data,
    check_groupings,
    eval_mode,
    load_batch,
)
from worker.engine.curvature import group_subsamples
from worker.engine.errors import EngineError


@dataclass(frozen=True)
class GroupDirectional:
    """One grouping's first and second directional derivatives of J_a along δ, indexed by group code."""

    dot: np.ndarray  # float64 mean of g_i·δ over the group's subsample (g_a·δ when it is the whole group)
    dot_se: np.ndarray  # float64 its standard error: 0 when the whole group was used
    quadratic: np.ndarray  # float64 mean of δᵀH_iδ over the subsample
    quadratic_se: np.ndarray  # float64 its standard error: 0 when the whole group was used
    predicted_se: np.ndarray  # float64 standard error of dot + ½ quadratic (their covariance included)
    examples_used: np.ndarray  # int64 min(n_a, max_examples)
    counts: np.ndarray  # int64 n_a; every figure is 0 where counts == 0


def group_directional(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    groupings: Sequence[np.ndarray],
    direction: Tensors,
    *,
    n_groups: Sequence[int] | None = None,
    masks: Tensors | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: Device = "cpu",
) -> list[GroupDirectional]:
    """g_a·δ and δᵀH_aδ for every group of every grouping, from per-example derivatives on each group's
    `curvature_subsample` of seed (seed, k, a) (None = every example); an example in several groups'
    subsamples is computed once. With `masks`, δ ⊙ m. Standard errors are those of a mean of a sample drawn
    without replacement (finite-population corrected), so they are 0 when the whole group was used."""
    check_batch_size(batch_size)
    state = State(model, params, masks)
    codes, sizes = check_groupings(groupings, n_groups, len(x))
    check_data(x, y)
    (aligned,), _ = aligned_directions(direction, state)
    along = dict(zip(state.leaves, state.masked(aligned), strict=True))
    samples = group_subsamples(codes, sizes, max_examples, seed)
    first, second = np.zeros(len(x)), np.zeros(len(x))
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(samples.rows), batch_size):
            index = samples.rows[start : start + batch_size]
            first[index], second[index] = _per_example_derivatives(
                state, along, *load_batch(x, y, index, state.dtype, device)
            )
    return [_summaries(per_group, first, second, codes[k], sizes[k]) for k, per_group in enumerate(samples.members)]


def _per_example_derivatives(
    state: State, along: dict[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """d/dt and d²/dt² of every example's loss at θ + tδ, t = 0 (forward over forward mode)."""
    leaves = {name: leaf.detach() for name, leaf in state.leaves.items()}
    one = torch.ones((), dtype=state.dtype, device=inputs.device)

    def losses(t: torch.Tensor) -> torch.Tensor:
        point = {name: leaf + t * along[name] for name, leaf in leaves.items()}
        logits = functional_call(state.model, {**state.constants, **point}, (inputs,))
        return F.cross_entropy(logits, labels, reduction="none")

    def slopes(t: torch.Tensor) -> torch.Tensor:
        return jvp(losses, (t,), (one,))[1]

    derivatives = jvp(slopes, (torch.zeros_like(one),), (one,))
    first, second = derivatives[0], derivatives[1]
    if not (torch.isfinite(first).all() and torch.isfinite(second).all()):
        raise EngineError("the model produced NaN or infinite derivatives along δ; check the weights")
    return first.double().cpu().numpy(), second.double().cpu().numpy()


def _summaries(
    per_group: list[np.ndarray], first: np.ndarray, second: np.ndarray, codes: np.ndarray, size: int
) -> GroupDirectional:
    counts = np.bincount(codes[codes >= 0], minlength=size).astype(np.int64)
    figures = np.zeros((5, size))
    used = np.zeros(size, dtype=np.int64)
    for group, members in enumerate(per_group):
        if len(members) == 0:
            continue
        n = len(members)
        a, b = first[members], second[members]
        figures[[0, 2], group] = a.mean(), b.mean()
        if n > 1:  # one example has no spread; a whole group has no sampling error (the correction is 0)
            correction = math.sqrt(max(0.0, 1 - n / counts[group]) / n)
            figures[[1, 3, 4], group] = [v.std(ddof=1) * correction for v in (a, b, a + 0.5 * b)]
        used[group] = n
    dot, dot_se, quadratic, quadratic_se, predicted_se = figures
    return GroupDirectional(dot, dot_se, quadratic, quadratic_se, predicted_se, used, counts)


def parameter_delta(dense_params: Tensors, pruned_params: Tensors) -> dict[str, torch.Tensor]:
    """δ = θs − θd for every floating-point tensor name the two share (pass `named_parameters()`,
    not `state_dict()`: buffers such as BatchNorm statistics are not parameters of the loss)."""
    if dense_params.keys() != pruned_params.keys():
        only = sorted(dense_params.keys() ^ pruned_params.keys())
        raise EngineError(f"dense and pruned parameters differ in names: {', '.join(only[:5])}")
    delta = {}
    for name, dense in dense_params.items():
        pruned = pruned_params[name]
        if dense.shape != pruned.shape:
            raise EngineError(f"parameter {name} has shape {tuple(dense.shape)} dense but {tuple(pruned.shape)} pruned")
        if dense.is_floating_point():
            delta[name] = pruned.detach() - dense.detach().to(pruned.device)
    return delta


def delta_norm(delta: Tensors) -> float:
    """‖δ‖₂ over all entries, in float64."""
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in delta.values()))


def predicted_excessive_loss(grad_dot_delta: np.ndarray, delta_hessian_delta: np.ndarray) -> np.ndarray:
    """R_hat(a) = g_a·δ + ½ δᵀH_aδ (Tran Thm 1 identity without the O(‖δ‖³) rest): a prediction from
    the dense model's derivatives, never a measurement of R(a)."""
    return np.asarray(grad_dot_delta, dtype=np.float64) + 0.5 * np.asarray(delta_hessian_delta, dtype=np.float64)


def bound_terms(
    grad_norms: np.ndarray, top_eigenvalues: np.ndarray, delta_norm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tran Theorem 1's two terms: (‖g_a‖·‖δ‖, ½ λ_max(H_a)·‖δ‖²)."""
    norms = np.asarray(grad_norms, dtype=np.float64)
    eigenvalues = np.asarray(top_eigenvalues, dtype=np.float64)
    return norms * delta_norm, 0.5 * eigenvalues * delta_norm**2
