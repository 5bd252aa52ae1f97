"""The Gauss–Newton trace of every group's mean loss, for all groups of all groupings in one pass over a capped,
seeded subsample: Tr(G_a) = (1/n_a) Σ_i Tr(J_iᵀ(diag p_i − p_i p_iᵀ)J_i), J_i the logit Jacobian at x_i.
Definitions: docs/METHODS.md §11.

For softmax cross-entropy, diag p − ppᵀ is the covariance of e_ŷ − p with ŷ drawn from the model's own
prediction p, so ‖∇_θ ℓ(x_i, ŷ_i)‖² with one seeded draw ŷ_i per example is an unbiased estimate of example
i's Gauss–Newton trace; the group's estimate is the mean over its subsample, and its standard error the
spread of those per-example values over √n. It needs per-example gradients (torch.func vmap of grad) and
no Hessian-vector product: G is the positive semi-definite part of the Hessian (Tran's Theorem 2 is argued
in this form), the residual part Σ_c (p_c − y_c)∇²z_c is left out.

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
from torch.func import functional_call, grad, vmap

from worker.engine._state import (
    Device,
    State,
    Tensors,
    check_batch_size,
    check_data,
    check_groupings,
    eval_mode,
    load_batch,
)
from worker.engine.curvature import group_subsamples


@dataclass(frozen=True)
class GroupGaussNewton:
    """One grouping's Gauss–Newton trace estimates, indexed by group code."""

    trace: np.ndarray  # float64 mean over the subsample of ‖m ⊙ ∇ℓ(x_i, ŷ_i)‖²; 0 for empty groups
    trace_se: np.ndarray  # float64 std(ddof=1)/√n of those values (0 with a single example)
    examples_used: np.ndarray  # int64 min(n_a, max_examples)


def group_gauss_newton_trace(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    groupings: Sequence[np.ndarray],
    *,
    n_groups: Sequence[int] | None = None,
    masks: Tensors | None = None,
    max_examples: int = 512,
    seed: int = 0,
    batch_size: int = 64,
    device: Device = "cpu",
) -> list[GroupGaussNewton]:
    """Tr(G_a) ± standard error for every group of every grouping. Group a of grouping k uses the
    `curvature_subsample` of seed (seed, k, a); an example in several groups' subsamples is computed once.
    `batch_size` bounds the per-example gradients held at once (batch × parameters)."""
    check_batch_size(batch_size)
    state = State(model, params, masks)
    codes, sizes = check_groupings(groupings, n_groups, len(x))
    check_data(x, y)
    samples = group_subsamples(codes, sizes, max_examples, seed)
    values = np.zeros(len(x))
    with eval_mode(model):
        values[samples.rows] = _sampled_square_norms(
            state, x, y, samples.rows, np.random.default_rng([seed, 1 << 20]), batch_size, device
        )
    results = []
    for per_group in samples.members:
        trace, se, used = (np.zeros(len(per_group)) for _ in range(3))
        for group, members in enumerate(per_group):
            if len(members):
                trace[group] = values[members].mean()
                se[group] = values[members].std(ddof=1) / math.sqrt(len(members)) if len(members) > 1 else 0.0
                used[group] = len(members)
        results.append(GroupGaussNewton(trace=trace, trace_se=se, examples_used=used.astype(np.int64)))
    return results


def _sampled_square_norms(
    state: State,
    x: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    device: Device,
) -> np.ndarray:
    """‖m ⊙ ∇_θ ℓ(x_i, ŷ_i)‖² for each row, ŷ_i drawn from softmax(z(x_i)) by inverse CDF of one uniform each."""
    leaves = {name: leaf.detach() for name, leaf in state.leaves.items()}
    masks = dict(zip(leaves, state.masks, strict=True)) if state.masks is not None else None

    def loss(point: dict[str, torch.Tensor], inputs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = functional_call(state.model, {**state.constants, **point}, (inputs.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    out = np.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        inputs, _ = load_batch(x, y, index, state.dtype, device)
        with torch.no_grad():
            probabilities = torch.softmax(functional_call(state.model, {**state.constants, **leaves}, (inputs,)), 1)
        cumulative = probabilities.double().cumsum(1).cpu().numpy()
        draws = (cumulative < rng.random((len(index), 1)) * cumulative[:, -1:]).sum(1)
        labels = torch.from_numpy(np.minimum(draws, cumulative.shape[1] - 1)).to(device)
        gradients = per_example(leaves, inputs, labels)
        squares = torch.zeros(len(index), dtype=torch.float64, device=inputs.device)
        for name, g in gradients.items():
            g = g * masks[name] if masks is not None else g
            squares += g.flatten(1).double().square().sum(1)
        out[start : start + len(index)] = squares.cpu().numpy()
    return out
