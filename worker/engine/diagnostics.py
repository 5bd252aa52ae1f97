"""Per-group loss geometry of a model (docs/METHODS.md §9–§12): exact gradient norms of each group's mean
loss, Hessian trace (Hutchinson) and top eigenvalue (power iteration) on a capped subsample, the
quadratic form δᵀH_aδ, and Tran's second-order prediction of the excessive loss
R_hat(a) = g_a·δ + ½ δᵀH_aδ with its two Theorem-1 bound terms.

Conventions shared by every function:

- `model` is evaluated functionally at `params` with `torch.func.functional_call`: `params` maps
  names of the model's parameters and/or buffers to tensors and overrides the module's own ones
  (`None` = the module's own state). So a caller whose module holds the pruned weights can pass the
  dense state. Derivatives are taken with respect to the model's trainable parameters
  (`requires_grad`); buffers and frozen parameters are constants. The model is put in eval mode
  (BatchNorm running statistics, no dropout) and its mode is restored afterwards; its own
  parameters and their `.grad` are never touched.
- Loss = cross-entropy. J_a is the MEAN loss over group a's examples; g_a = ∇J_a and H_a = ∇²J_a.
- `x`, `y` are numpy arrays (x may be a read-only memmap: one batch at a time is copied). Inputs are
  cast to the parameters' dtype, as in `metrics.evaluate`.
- A grouping is an int array of codes, one per example, in 0..G−1, or −1 for "no group" (the
  example is left out of that grouping). Groups without examples get 0 and `counts == 0`; no NaN.
- `masks` (name → bool tensor, True = kept, as from `MagnitudePruner.compute_masks`) restrict
  everything to the unmasked coordinates: gradients become g ⊙ m, Hessians P H P with P = diag(m).
  Parameters without a mask are entirely kept.
- Curvature estimates draw their subsample, probes and start vectors from numpy Generators seeded
  with `seed`, so equal inputs give identical numbers.

Hessian-vector products use double backprop (reverse-over-reverse); measured on this CPU it beat
`torch.func` forward-over-reverse (jvp of grad) 2.4× for 32 probes on a 0.4M-parameter MLP (the
first-order graph is built once and reused by every probe) and forward-over-forward 1.5× (MLP)
and 1.6× (BatchNorm CNN) for δᵀHδ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from worker.engine.errors import EngineError

Tensors = Mapping[str, torch.Tensor]
Device = torch.device | str

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of per-group gradient buffers group_gradients may hold


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class GroupGradients:
    """One grouping's exact group-gradient figures, indexed by group code 0..G−1."""

    norms: np.ndarray  # float64 ‖g_a‖ = ‖(1/n_a) Σ_{i∈a} ∇ℓ_i‖ (⊙ mask); 0 where counts == 0
    counts: np.ndarray  # int64 n_a
    dot: np.ndarray | None  # float64 g_a·δ: shape (G,) for one delta, (G, D) for D deltas; None without
    passes: int  # forward+backward passes over the data the whole call made (1 = all groupings shared one)


@dataclass(frozen=True)
class GroupDirectional:
    """One grouping's first and second directional derivatives of J_a along given directions δ."""

    dot: np.ndarray  # float64 g_a·δ; shape (G,) for one direction, (G, D) for D
    quadratic: np.ndarray  # float64 δᵀH_aδ, same shape
    counts: np.ndarray  # int64 n_a; both arrays are 0 where counts == 0


@dataclass(frozen=True)
class GroupCurvature:
    """Hessian trace and top eigenvalue of each group's mean loss on its capped subsample."""

    trace: np.ndarray  # float64 Hutchinson estimate of Tr(H_a) (restricted to the mask)
    trace_se: np.ndarray  # float64 its standard error, std(ddof=1)/√probes (NaN only when probes == 1)
    top_eigenvalue: np.ndarray  # float64 λ_max(H_a) by power iteration (restricted to the mask)
    eigenvalue_converged: np.ndarray  # bool: the Rayleigh quotient settled within the iteration cap
    examples_used: np.ndarray  # int64 min(n_a, max_examples); 0 = empty group, all figures 0
    counts: np.ndarray  # int64 n_a


# ---------------------------------------------------------------------------------------------------
# Exact group gradients


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
    _check_batch_size(batch_size)
    state = _State(model, params, masks)
    codes, sizes = _check_groupings(groupings, n_groups, len(x))
    _check_data(x, y)
    deltas, single = _directions(delta, state)
    group_bytes = state.numel * state.dtype.itemsize
    plan = _plan_passes(sizes, group_bytes, memory_budget_bytes)
    sumsq = [np.zeros(size) for size in sizes]
    dots = [np.zeros((size, len(deltas))) for size in sizes]
    with _eval_mode(model):
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
    state: _State,
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
            dots[k][group, d] = sum(float(torch.vdot(t.flatten().double(), v.flatten().double()))
                                    for t, v in zip(total, delta, strict=True))

    running: list[torch.Tensor] | None = None
    running_group = -1
    for cell_codes, batches in _cells([codes[major], *(codes[k] for k in buffered)], batch_size):
        for leaf in leaves:
            leaf.grad = None
        for index in batches:
            inputs, labels = _batch(x, y, index, state.dtype, device)
            state.loss_sum(inputs, labels).backward()
        cell = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        for k, code in zip(buffered, cell_codes[1:], strict=True):
            if code >= 0:
                if buffers[k][code] is None:
                    buffers[k][code] = [t.clone() for t in cell]
                else:
                    torch._foreach_add_(buffers[k][code], cell)
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


def _cells(codes: list[np.ndarray], batch_size: int) -> Iterator[tuple[tuple[int, ...], list[np.ndarray]]]:
    """Yield (codes of the cell, its batches of example indices) for every cell (unique combination
    of codes, −1 included) with at least one code ≥ 0, in lexicographic order with codes[0] major.
    Within a cell, examples keep dataset order; a batch never mixes cells."""
    stacked = np.stack(codes, axis=1)
    keep = np.flatnonzero((stacked >= 0).any(axis=1))
    if len(keep) == 0:
        return
    order = keep[np.lexsort(stacked[keep].T[::-1])]
    rows = stacked[order]
    starts = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]).any(axis=1)])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends, strict=True):
        batches = [order[b:min(b + batch_size, end)] for b in range(start, end, batch_size)]
        yield tuple(int(c) for c in rows[start]), batches


# ---------------------------------------------------------------------------------------------------
# Directional derivatives: g_a·δ and δᵀH_aδ over all of a group's examples


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
    _check_batch_size(batch_size)
    state = _State(model, params, masks)
    codes, sizes = _check_groupings(groupings, n_groups, len(x))
    _check_data(x, y)
    directions, single = _directions(direction, state)
    if not directions:
        raise EngineError("group_directional needs at least one direction")
    directions = [state.masked([v.to(device) for v in d]) for d in directions]
    first = [np.zeros((size, len(directions))) for size in sizes]
    second = [np.zeros((size, len(directions))) for size in sizes]
    leaves = list(state.leaves.values())
    with _eval_mode(model):
        for cell_codes, batches in _cells(codes, batch_size):
            cell_first, cell_second = np.zeros(len(directions)), np.zeros(len(directions))
            for index in batches:
                inputs, labels = _batch(x, y, index, state.dtype, device)
                loss = state.loss_sum(inputs, labels)
                grads = torch.autograd.grad(loss, leaves, create_graph=True)
                for d, v in enumerate(directions):
                    slope = sum((g * t).sum() for g, t in zip(grads, v, strict=True))
                    hv = torch.autograd.grad(slope, leaves, retain_graph=d < len(directions) - 1)
                    cell_first[d] += float(slope.detach())
                    cell_second[d] += sum(float(torch.vdot(h.flatten().double(), t.flatten().double()))
                                          for h, t in zip(hv, v, strict=True))
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
    (result,) = group_directional(model, params, x, y, [np.zeros(len(x), np.int64)], direction,
                                  masks=masks, batch_size=batch_size, device=device)
    return float(result.quadratic[0])


# ---------------------------------------------------------------------------------------------------
# Curvature on a capped, seeded subsample


def curvature_subsample(n: int, max_examples: int, seed: int | Sequence[int]) -> np.ndarray:
    """Indices (sorted) of the examples the curvature estimates use out of a group of n: all of them
    when n ≤ max_examples, else max_examples drawn without replacement by a numpy Generator."""
    if max_examples < 1:
        raise EngineError(f"max_examples must be at least 1, got {max_examples}")
    if n <= max_examples:
        return np.arange(n)
    return np.sort(np.random.default_rng(_streams(seed)[0]).choice(n, size=max_examples, replace=False))


def hutchinson_trace(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    *,
    masks: Tensors | None = None,
    probes: int = 32,
    max_examples: int = 512,
    seed: int | Sequence[int] = 0,
    batch_size: int = 512,
    device: Device = "cpu",
) -> tuple[float, float]:
    """(Tr(H), standard error) of the mean loss over (x, y) (one group) restricted to the mask, by
    Hutchinson's estimator (1/m) Σ_j v_jᵀHv_j with m = `probes` Rademacher vectors v_j ⊙ mask, on
    the `curvature_subsample` of at most `max_examples` examples. The first-order graph is built
    once and reused by every probe when the subsample fits one batch of `batch_size`."""
    _check_probes(probes)
    _check_data(x, y)
    state = _State(model, params, masks)
    rows = curvature_subsample(len(y), max_examples, seed)
    with _eval_mode(model):
        operator = _HessianOperator(state, x, y, rows, batch_size, device)
        return _hutchinson(operator, probes, _streams(seed)[1])


def top_eigenvalue(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    *,
    masks: Tensors | None = None,
    iterations: int = 20,
    tolerance: float = 1e-3,
    max_examples: int = 512,
    seed: int | Sequence[int] = 0,
    batch_size: int = 512,
    device: Device = "cpu",
) -> float:
    """λ_max(H) (the largest, signed) of the mean loss over (x, y) restricted to the mask, by power
    iteration on Hessian-vector products (at most `iterations`, stopping once the Rayleigh quotient
    moves less than `tolerance` relatively), on the `curvature_subsample`. Power iteration finds
    the largest |λ|; if that eigenvalue is negative (or ±λ of similar size keep it from settling),
    it iterates again on H + ρI, ρ the spectral radius found, and subtracts ρ (docs/METHODS.md §11), so
    the cost is up to 2 × `iterations` products."""
    _check_iterations(iterations, tolerance)
    _check_data(x, y)
    state = _State(model, params, masks)
    rows = curvature_subsample(len(y), max_examples, seed)
    with _eval_mode(model):
        operator = _HessianOperator(state, x, y, rows, batch_size, device)
        return _top_eigenvalue(operator, iterations, tolerance, _streams(seed)[2])[0]


def group_curvature(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    *,
    masks: Tensors | None = None,
    probes: int = 32,
    power_iterations: int = 20,
    tolerance: float = 1e-3,
    max_examples: int = 512,
    seed: int = 0,
    batch_size: int = 512,
    device: Device = "cpu",
) -> GroupCurvature:
    """Hutchinson trace (± standard error) and top eigenvalue of every group's mean-loss Hessian,
    sharing one subsample and one first-order graph per group. Group a uses seed (seed, a), so
    `hutchinson_trace(model, params, x[codes == a], y[codes == a], seed=(seed, a), ...)` gives the
    same numbers. Empty groups get zeros and examples_used == 0. Only the subsample is read from x."""
    _check_probes(probes)
    _check_iterations(power_iterations, tolerance)
    (codes,), (size,) = _check_groupings([codes], [n_groups], len(x))
    _check_data(x, y)
    state = _State(model, params, masks)
    trace, trace_se, top = np.zeros(size), np.zeros(size), np.zeros(size)
    converged = np.zeros(size, dtype=bool)
    used = np.zeros(size, dtype=np.int64)
    counts = np.bincount(codes[codes >= 0], minlength=size).astype(np.int64)
    with _eval_mode(model):
        for group in np.flatnonzero(counts):
            members = np.flatnonzero(codes == group)
            group_seed = (seed, int(group))
            _, probe_rng, power_rng = _streams(group_seed)
            rows = members[curvature_subsample(len(members), max_examples, group_seed)]
            operator = _HessianOperator(state, x, y, rows, batch_size, device)
            trace[group], trace_se[group] = _hutchinson(operator, probes, probe_rng)
            top[group], converged[group] = _top_eigenvalue(operator, power_iterations, tolerance, power_rng)
            used[group] = len(rows)
            del operator  # frees the retained graph before the next group builds its own
    return GroupCurvature(trace=trace, trace_se=trace_se, top_eigenvalue=top, eigenvalue_converged=converged,
                          examples_used=used, counts=counts)


class _HessianOperator:
    """v ↦ P H P v on flat vectors, H the Hessian of the mean loss over the examples `rows` of
    (x, y). When they fit one batch, the first-order graph is built once and reused by every
    product; otherwise each product rebuilds it batch by batch, so memory stays at one batch."""

    def __init__(
        self, state: _State, x: np.ndarray, y: np.ndarray, rows: np.ndarray, batch_size: int, device: Device
    ) -> None:
        _check_batch_size(batch_size)
        if len(rows) == 0:
            raise EngineError("cannot estimate the curvature of a group with no examples")
        self.state, self.n = state, len(rows)
        self.leaves = list(state.leaves.values())
        self.batches = [_batch(x, y, rows[start:start + batch_size], state.dtype, device)
                        for start in range(0, len(rows), batch_size)]
        self.retained = self._gradient(*self.batches[0]) if len(self.batches) == 1 else None

    def _gradient(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(self.state.loss_sum(inputs, labels), self.leaves, create_graph=True)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        mask = self.state.flat_mask
        pieces = self.state.unflatten(v * mask if mask is not None else v)
        if self.retained is not None:
            products = [torch.autograd.grad(self.retained, self.leaves, grad_outputs=pieces, retain_graph=True)]
        else:
            products = [torch.autograd.grad(self._gradient(*batch), self.leaves, grad_outputs=pieces)
                        for batch in self.batches]
        hv = torch.cat([sum(parts).flatten() for parts in zip(*products, strict=True)]) / self.n
        return hv * mask if mask is not None else hv


def _hutchinson(operator: _HessianOperator, probes: int, rng: np.random.Generator) -> tuple[float, float]:
    samples = np.empty(probes)
    numel, state = operator.state.numel, operator.state
    for j in range(probes):
        signs = rng.integers(0, 2, size=numel, dtype=np.int8) * 2 - 1
        v = torch.from_numpy(signs).to(device=state.device, dtype=state.dtype)
        if state.flat_mask is not None:
            v = v * state.flat_mask
        samples[j] = _vdot(v, operator(v))
    # One probe has no spread to measure: its standard error is unknown (NaN), not 0.
    se = float(samples.std(ddof=1) / math.sqrt(probes)) if probes > 1 else math.nan
    return float(samples.mean()), se


def _top_eigenvalue(
    operator: _HessianOperator, iterations: int, tolerance: float, rng: np.random.Generator
) -> tuple[float, bool]:
    """(λ_max, converged). Phase 1: power iteration on H gives the largest-|λ| Rayleigh quotient r
    and the spectral radius estimate ρ = ‖Hv‖. When r settled near +ρ, that is λ_max. Otherwise
    (r < 0, or r well below ρ because +λ and −λ of similar size keep v from settling) phase 2
    iterates on H + ρI, whose eigenvalues are ≥ 0 (ρ ≥ |λ_min| up to convergence), and returns its
    top eigenvalue − ρ."""
    state = operator.state
    r, rho, converged = _power_iteration(operator, _start_vector(state, rng), iterations, tolerance)
    if rho == 0.0 or (r >= 0 and r >= (1 - 10 * tolerance) * rho):
        return r, converged
    shift = rho
    shifted, _, converged = _power_iteration(lambda v: operator(v) + shift * v, _start_vector(state, rng),
                                             iterations, tolerance)
    return shifted - shift, converged


def _power_iteration(
    apply: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, iterations: int, tolerance: float
) -> tuple[float, float, bool]:
    """(Rayleigh quotient, ‖Av‖, converged) after at most `iterations` products."""
    previous = None
    quotient, norm = 0.0, 0.0
    for _ in range(iterations):
        av = apply(v)
        quotient, norm = _vdot(v, av), float(torch.linalg.vector_norm(av.double()))
        if norm == 0.0:
            return 0.0, 0.0, True
        v = av / norm
        if previous is not None and abs(quotient - previous) <= tolerance * abs(quotient):
            return quotient, norm, True
        previous = quotient
    return quotient, norm, False


def _start_vector(state: _State, rng: np.random.Generator) -> torch.Tensor:
    v = torch.from_numpy(rng.standard_normal(state.numel)).to(device=state.device, dtype=state.dtype)
    if state.flat_mask is not None:
        v = v * state.flat_mask
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > 0 else v


def _streams(seed: int | Sequence[int]) -> tuple[np.random.Generator, ...]:
    """Independent Generators for the subsample, the Hutchinson probes and the power-iteration
    start vectors, so each function draws the same numbers whichever others run."""
    entropy = [seed] if isinstance(seed, int | np.integer) else list(seed)
    if any(int(s) < 0 for s in entropy):
        raise EngineError(f"seeds must be non-negative integers, got {seed}")
    return tuple(np.random.default_rng(child) for child in np.random.SeedSequence([int(s) for s in entropy]).spawn(3))


# ---------------------------------------------------------------------------------------------------
# Tran's second-order prediction and bound


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
            delta[name] = (pruned.detach() - dense.detach().to(pruned.device))
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


# ---------------------------------------------------------------------------------------------------
# Shared plumbing


class _State:
    """The point the model is evaluated at: trainable leaves (requiring grad, sharing memory with
    the given tensors), constant overrides, and the flattened mask."""

    def __init__(self, model: nn.Module, params: Tensors | None, masks: Tensors | None) -> None:
        self.model = model
        named = dict(model.named_parameters())
        known = {**named, **dict(model.named_buffers())}
        params = {} if params is None else dict(params)
        unknown = sorted(params.keys() - known.keys())
        if unknown:
            raise EngineError(f"params name tensors the model does not have: {', '.join(unknown[:5])}")
        for name, tensor in params.items():
            if tuple(tensor.shape) != tuple(known[name].shape):
                raise EngineError(
                    f"params[{name!r}] has shape {tuple(tensor.shape)}; the model expects {tuple(known[name].shape)}"
                )
        trainable = [name for name, p in named.items() if p.requires_grad]
        if not trainable:
            raise EngineError("the model has no trainable parameters to differentiate")
        self.leaves = {name: params.get(name, named[name]).detach().requires_grad_() for name in trainable}
        self.constants = {name: t.detach() for name, t in params.items() if name not in self.leaves}
        dtypes = {leaf.dtype for leaf in self.leaves.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise EngineError(f"trainable parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        self.dtype = next(iter(dtypes))
        self.device = next(iter(self.leaves.values())).device
        self.shapes = [leaf.shape for leaf in self.leaves.values()]
        self.sizes = [leaf.numel() for leaf in self.leaves.values()]
        self.numel = sum(self.sizes)
        self.masks = self._masks(masks)
        self.flat_mask = None if self.masks is None else torch.cat([m.flatten() for m in self.masks])

    def _masks(self, masks: Tensors | None) -> list[torch.Tensor] | None:
        return _aligned(self, masks, "mask", torch.ones_like) if masks else None

    def loss_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the model at this state on one batch."""
        logits = functional_call(self.model, {**self.constants, **self.leaves}, (inputs,))
        n_classes = logits.shape[1]
        if int(labels.max()) >= n_classes:
            raise EngineError(f"labels must be class indices in [0, {n_classes}) for this model; "
                              f"got label {int(labels.max())}")
        if not torch.isfinite(logits).all():
            raise EngineError("the model produced NaN or infinite outputs; check the input scaling and the weights")
        return F.cross_entropy(logits, labels, reduction="sum")

    def masked(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.masks is None:
            return tensors
        return [t * m for t, m in zip(tensors, self.masks, strict=True)]

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [piece.view(shape) for piece, shape in zip(flat.split(self.sizes), self.shapes, strict=True)]


def _batch(
    x: np.ndarray, y: np.ndarray, index: np.ndarray, dtype: torch.dtype, device: Device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Fancy indexing copies: a writable batch even when x is a read-only memmap.
    inputs = torch.from_numpy(np.asarray(x[index])).to(device=device, dtype=dtype)
    labels = torch.from_numpy(np.asarray(y[index], dtype=np.int64)).to(device)
    return inputs, labels


class _eval_mode:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _directions(
    delta: Tensors | Sequence[Tensors] | None, state: _State
) -> tuple[list[list[torch.Tensor]], bool]:
    """Directions as lists of tensors aligned with the leaves (missing names = 0), and whether a
    single dict (rather than a sequence) was given."""
    if delta is None:
        return [], False
    single = isinstance(delta, Mapping)
    result = []
    for d in [delta] if single else delta:
        result.append(_aligned(state, d, "delta", torch.zeros_like))
    return result, single


def _aligned(state: _State, tensors: Tensors, what: str, fill) -> list[torch.Tensor]:
    """`tensors` (name → tensor) as one tensor per trainable parameter, in the state's order, on its device
    and dtype; parameters not named get `fill(leaf)` (ones for masks, zeros for directions)."""
    unknown = sorted(tensors.keys() - state.leaves.keys())
    if unknown:
        raise EngineError(f"{what} names tensors that are not trainable parameters: {', '.join(unknown[:5])}")
    result = []
    for name, leaf in state.leaves.items():
        tensor = tensors.get(name)
        if tensor is not None and tensor.shape != leaf.shape:
            raise EngineError(f"{what} {name} has shape {tuple(tensor.shape)}; the parameter has {tuple(leaf.shape)}")
        result.append(fill(leaf, dtype=state.dtype).detach() if tensor is None
                      else tensor.detach().to(device=state.device, dtype=state.dtype))
    return result


def _check_groupings(
    groupings: Sequence[np.ndarray], n_groups: Sequence[int] | None, n: int
) -> tuple[list[np.ndarray], list[int]]:
    if len(groupings) == 0:
        raise EngineError("at least one grouping is needed")
    if n_groups is not None and len(n_groups) != len(groupings):
        raise EngineError(f"{len(groupings)} groupings but {len(n_groups)} group counts")
    codes, sizes = [], []
    for k, grouping in enumerate(groupings):
        grouping = np.asarray(grouping)
        if grouping.shape != (n,) or not np.issubdtype(grouping.dtype, np.integer):
            raise EngineError(f"grouping {k} must be one integer code per example ({n}), got shape {grouping.shape} "
                              f"and dtype {grouping.dtype}")
        grouping = grouping.astype(np.int64)
        size = int(grouping.max(initial=-1)) + 1 if n_groups is None else int(n_groups[k])
        if size < 0:
            raise EngineError(f"grouping {k} cannot have {size} groups")
        if n and grouping.min() < -1:
            raise EngineError(f"grouping {k} has codes below −1 (−1 means no group)")
        if n and grouping.max() >= size:
            raise EngineError(f"grouping {k} has code {int(grouping.max())}, but only {size} groups (0..{size - 1})")
        codes.append(grouping)
        sizes.append(size)
    return codes, sizes


def _check_data(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise EngineError(f"dataset has {len(x)} inputs but {len(y)} labels")
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise EngineError(f"labels must be integer class indices, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise EngineError(f"labels must be class indices ≥ 0, got {int(y.min())}")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise EngineError(f"batch size must be at least 1, got {batch_size}")


def _check_probes(probes: int) -> None:
    if probes < 1:
        raise EngineError(f"Hutchinson needs at least 1 probe, got {probes}")


def _check_iterations(iterations: int, tolerance: float) -> None:
    if iterations < 1:
        raise EngineError(f"power iteration needs at least 1 iteration, got {iterations}")
    if not tolerance > 0:
        raise EngineError(f"the power-iteration tolerance must be positive, got {tolerance}")


def _vdot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.vdot(a.double(), b.double()))
