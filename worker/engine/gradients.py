"""Exact gradient norms ‖g_a‖ of every group's mean loss J_a (and g_a·δ for given directions δ), for several
groupings in one forward+backward pass over the data. Definitions: docs/METHODS.md §10.

Conventions (params, masks, groupings, seeds, eval mode): worker/engine/_state.py.
"""

from __future__ import annotations

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

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of per-group gradient buffers group_gradients may hold


@dataclass(frozen=True)
class GroupGradients:
    """One grouping's exact group-gradient figures, indexed by group code 0..G−1."""

    norms: np.ndarray  # float64 ‖g_a‖ = ‖(1/n_a) Σ_{i∈a} ∇ℓ_i‖ (⊙ mask); 0 where counts == 0
    counts: np.ndarray  # int64 n_a
    dot: np.ndarray | None  # float64 g_a·δ: shape (G,) for one delta, (G, D) for D deltas; None without
    passes: int  # forward+backward passes over the data the whole call made (1 = all groupings shared one)


def group_gradients(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    groupings: Sequence[np.ndarray],
    *,
    n_groups: Sequence[int] | None = None,
    masks: Tensors | None = None,
    delta: Tensors | Sequence[Tensors] | None = None,
    batch_size: int = 256,
    device: Device = "cpu",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> list[GroupGradients]:
    """Exact ‖g_a‖ (and g_a·δ when `delta` is given) for every group of every grouping, in one
    forward+backward pass over the data for all groupings together.

    Examples are sorted by their cell (the combination of codes over all groupings) and batched
    within cells; each batch's summed loss is backpropagated once, a cell's summed gradient is added
    to its group in each grouping, and each group's sum is divided by n_a once (never a mean of
    per-example norms). The grouping with the most groups is the major sort key, so its groups are
    contiguous and need one running buffer; the others hold one parameter-sized buffer per group.
    If those buffers would exceed `memory_budget_bytes`, groupings are spread over more passes (the
    result's `passes` says how many). `n_groups[k]` = G of grouping k (default max code + 1).
    `delta` = one name → tensor dict (dot shape (G,)) or a sequence of them (dot shape (G, D)), over
    trainable parameter names; missing names count as zero."""
    check_batch_size(batch_size)
    state = State(model, params, masks)
    codes, sizes = check_groupings(groupings, n_groups, len(x))
    check_data(x, y)
    deltas, single = aligned_directions(delta, state)
    group_bytes = state.numel * state.dtype.itemsize
    plan = _plan_passes(sizes, group_bytes, memory_budget_bytes)
    sumsq = [np.zeros(size) for size in sizes]
    dots = [np.zeros((size, len(deltas))) for size in sizes]
    with eval_mode(model):
        for major, buffered in plan:
            _gradient_pass(state, x, y, codes, sizes, major, buffered, deltas, sumsq, dots, batch_size, device)
    results = []
    for k, size in enumerate(sizes):
        counts = np.bincount(codes[k][codes[k] >= 0], minlength=size).astype(np.int64)
        divisor = np.maximum(counts, 1).astype(np.float64)
        dot = None
        if deltas:
            dot = dots[k] / divisor[:, None]
            dot = dot[:, 0] if single else dot
        results.append(GroupGradients(norms=np.sqrt(sumsq[k]) / divisor, counts=counts, dot=dot, passes=len(plan)))
    return results


def _plan_passes(sizes: list[int], group_bytes: int, budget: int) -> list[tuple[int, list[int]]]:
    """(major grouping, buffered groupings) per pass: the largest remaining grouping leads a pass
    and takes along every other grouping whose buffers still fit the budget."""
    remaining = sorted(range(len(sizes)), key=lambda k: -sizes[k])
    plan = []
    while remaining:
        major = remaining.pop(0)
        buffered, used = [], 0
        for k in list(remaining):
            if (used + sizes[k]) * group_bytes <= budget:
                buffered.append(k)
                used += sizes[k]
                remaining.remove(k)
        plan.append((major, buffered))
    return plan


def _gradient_pass(
    state: State,
    x: np.ndarray,
    y: np.ndarray,
    codes: list[np.ndarray],
    sizes: list[int],
    major: int,
    buffered: list[int],
    deltas: list[list[torch.Tensor]],
    sumsq: list[np.ndarray],
    dots: list[np.ndarray],
    batch_size: int,
    device: Device,
) -> None:
    leaves = list(state.leaves.values())
    buffers: dict[int, list[list[torch.Tensor] | None]] = {k: [None] * sizes[k] for k in buffered}

    def finish(k: int, group: int, total: list[torch.Tensor]) -> None:
        total = state.masked(total)
        sumsq[k][group] = sum(float(t.double().square().sum()) for t in total)
        for d, delta in enumerate(deltas):
            dots[k][group, d] = sum(
                float(torch.vdot(t.flatten().double(), v.flatten().double())) for t, v in zip(total, delta, strict=True)
            )

    running: list[torch.Tensor] | None = None
    running_group = -1
    for cell_codes, batches in cells([codes[major], *(codes[k] for k in buffered)], batch_size):
        for leaf in leaves:
            leaf.grad = None
        for index in batches:
            inputs, labels = load_batch(x, y, index, state.dtype, device)
            state.loss_sum(inputs, labels).backward()
        cell = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        for k, code in zip(buffered, cell_codes[1:], strict=True):
            if code >= 0:
                buffer = buffers[k][code]
                if buffer is None:
                    buffers[k][code] = [t.clone() for t in cell]
                else:
                    torch._foreach_add_(buffer, cell)
        major_code = cell_codes[0]
        if major_code != running_group and running is not None:
            finish(major, running_group, running)
            running = None
        running_group = major_code
        if major_code >= 0:
            if running is None:
                running = cell  # owned: the leaves' .grad were detached from it above
            else:
                torch._foreach_add_(running, cell)
    if running is not None:
        finish(major, running_group, running)
    for k in buffered:
        for group, total in enumerate(buffers[k]):
            if total is not None:
                finish(k, group, total)
