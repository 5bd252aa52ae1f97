"""Directional derivatives of every group's mean loss J_a along δ = θs − θd (or any given directions): g_a·δ and
δᵀH_aδ over all of a group's examples; δ itself and its norm; and Tran's second-order prediction of the excessive
loss R_hat(a) = g_a·δ + ½ δᵀH_aδ with its two Theorem-1 bound terms. Definitions: docs/METHODS.md §12.

Conventions (params, masks, groupings, seeds, eval mode): worker/engine/_state.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from worker.engine._state import (
    Device,
    State,
    Tensors,
    aligned_directions,
    cells,
    check_batch_size,
    check_data,
    check_groupings,
    eval_mode,
    load_batch,
)
from worker.engine.errors import EngineError


@dataclass(frozen=True)
class GroupDirectional:
    """One grouping's first and second directional derivatives of J_a along given directions δ."""

    dot: np.ndarray  # float64 g_a·δ; shape (G,) for one direction, (G, D) for D
    quadratic: np.ndarray  # float64 δᵀH_aδ, same shape
    counts: np.ndarray  # int64 n_a; both arrays are 0 where counts == 0


def group_directional(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    groupings: Sequence[np.ndarray],
    direction: Tensors | Sequence[Tensors],
    *,
    n_groups: Sequence[int] | None = None,
    masks: Tensors | None = None,
    batch_size: int = 256,
    device: Device = "cpu",
) -> list[GroupDirectional]:
    """g_a·δ and δᵀH_aδ over ALL examples of every group of every grouping, in one pass: batches
    never mix cells; per batch one gradient of the summed loss (with its graph) and one
    Hessian-vector product per direction; a cell's scalars are added to its groups, then divided by
    n_a. `direction` = one dict (arrays of shape (G,)) or a sequence of D dicts (shape (G, D)); with
    `masks`, δ ⊙ m."""
    check_batch_size(batch_size)
    state = State(model, params, masks)
    codes, sizes = check_groupings(groupings, n_groups, len(x))
    check_data(x, y)
    directions, single = aligned_directions(direction, state)
    if not directions:
        raise EngineError("group_directional needs at least one direction")
    directions = [state.masked([v.to(device) for v in d]) for d in directions]
    first = [np.zeros((size, len(directions))) for size in sizes]
    second = [np.zeros((size, len(directions))) for size in sizes]
    leaves = list(state.leaves.values())
    with eval_mode(model):
        for cell_codes, batches in cells(codes, batch_size):
            cell_first, cell_second = np.zeros(len(directions)), np.zeros(len(directions))
            for index in batches:
                inputs, labels = load_batch(x, y, index, state.dtype, device)
                loss = state.loss_sum(inputs, labels)
                grads = torch.autograd.grad(loss, leaves, create_graph=True)
                for d, v in enumerate(directions):
                    slope = sum((g * t).sum() for g, t in zip(grads, v, strict=True))
                    assert isinstance(slope, torch.Tensor), "State has at least one leaf, so the sum is a tensor"
                    hv = torch.autograd.grad(slope, leaves, retain_graph=d < len(directions) - 1)
                    cell_first[d] += float(slope.detach())
                    cell_second[d] += sum(
                        float(torch.vdot(h.flatten().double(), t.flatten().double()))
                        for h, t in zip(hv, v, strict=True)
                    )
            for k, code in enumerate(cell_codes):
                if code >= 0:
                    first[k][code] += cell_first
                    second[k][code] += cell_second
    results = []
    for k, size in enumerate(sizes):
        counts = np.bincount(codes[k][codes[k] >= 0], minlength=size).astype(np.int64)
        divisor = np.maximum(counts, 1).astype(np.float64)[:, None]
        dot, quadratic = first[k] / divisor, second[k] / divisor
        if single:
            dot, quadratic = dot[:, 0], quadratic[:, 0]
        results.append(GroupDirectional(dot=dot, quadratic=quadratic, counts=counts))
    return results


def quadratic_form(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    direction: Tensors,
    *,
    masks: Tensors | None = None,
    batch_size: int = 256,
    device: Device = "cpu",
) -> float:
    """δᵀHδ for the mean loss over ALL of (x, y) (one group's examples): the sum of per-batch
    Hessian-vector products of the summed loss, dotted with δ, divided by n."""
    if len(x) == 0:
        raise EngineError("cannot compute a quadratic form over zero examples")
    (result,) = group_directional(
        model, params, x, y, [np.zeros(len(x), np.int64)], direction, masks=masks, batch_size=batch_size, device=device
    )
    return float(result.quadratic[0])


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
