"""Curvature of every group's mean loss on a capped, seeded subsample: Hessian trace (Hutchinson, with its
standard error) and top eigenvalue (power iteration, shifted when the largest |λ| is negative), from
Hessian-vector products. Definitions: docs/METHODS.md §11.

Conventions (params, masks, groupings, seeds, eval mode): worker/engine/_state.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from worker.engine._state import (
    Device,
    State,
    Tensors,
    check_batch_size,
    check_data,
    check_groupings,
    eval_mode,
    load_batch,
    vdot,
)
from worker.engine.errors import EngineError


@dataclass(frozen=True)
class GroupCurvature:
    """Hessian trace and top eigenvalue of each group's mean loss on its capped subsample."""

    trace: np.ndarray  # float64 Hutchinson estimate of Tr(H_a) (restricted to the mask)
    trace_se: np.ndarray  # float64 its standard error, std(ddof=1)/√probes (NaN only when probes == 1)
    top_eigenvalue: np.ndarray  # float64 λ_max(H_a) by power iteration (restricted to the mask)
    eigenvalue_converged: np.ndarray  # bool: the Rayleigh quotient settled within the iteration cap
    examples_used: np.ndarray  # int64 min(n_a, max_examples); 0 = empty group, all figures 0
    counts: np.ndarray  # int64 n_a


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
    check_data(x, y)
    state = State(model, params, masks)
    rows = curvature_subsample(len(y), max_examples, seed)
    with eval_mode(model):
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
    check_data(x, y)
    state = State(model, params, masks)
    rows = curvature_subsample(len(y), max_examples, seed)
    with eval_mode(model):
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
    (codes,), (size,) = check_groupings([codes], [n_groups], len(x))
    check_data(x, y)
    state = State(model, params, masks)
    trace, trace_se, top = np.zeros(size), np.zeros(size), np.zeros(size)
    converged = np.zeros(size, dtype=bool)
    used = np.zeros(size, dtype=np.int64)
    counts = np.bincount(codes[codes >= 0], minlength=size).astype(np.int64)
    with eval_mode(model):
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
    return GroupCurvature(
        trace=trace,
        trace_se=trace_se,
        top_eigenvalue=top,
        eigenvalue_converged=converged,
        examples_used=used,
        counts=counts,
    )


class _HessianOperator:
    """v ↦ P H P v on flat vectors, H the Hessian of the mean loss over the examples `rows` of
    (x, y). When they fit one batch, the first-order graph is built once and reused by every
    product; otherwise each product rebuilds it batch by batch, so memory stays at one batch."""

    def __init__(
        self, state: State, x: np.ndarray, y: np.ndarray, rows: np.ndarray, batch_size: int, device: Device
    ) -> None:
        check_batch_size(batch_size)
        if len(rows) == 0:
            raise EngineError("cannot estimate the curvature of a group with no examples")
        self.state, self.n = state, len(rows)
        self.leaves = list(state.leaves.values())
        self.batches = [
            load_batch(x, y, rows[start : start + batch_size], state.dtype, device)
            for start in range(0, len(rows), batch_size)
        ]
        self.retained = self._gradient(*self.batches[0]) if len(self.batches) == 1 else None

    def _gradient(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(self.state.loss_sum(inputs, labels), self.leaves, create_graph=True)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        mask = self.state.flat_mask
        pieces = self.state.unflatten(v * mask if mask is not None else v)
        if self.retained is not None:
            products = [torch.autograd.grad(self.retained, self.leaves, grad_outputs=pieces, retain_graph=True)]
        else:
            products = [
                torch.autograd.grad(self._gradient(*batch), self.leaves, grad_outputs=pieces) for batch in self.batches
            ]
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
        samples[j] = vdot(v, operator(v))
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
    shifted, _, converged = _power_iteration(
        lambda v: operator(v) + shift * v, _start_vector(state, rng), iterations, tolerance
    )
    return shifted - shift, converged


def _power_iteration(
    apply: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, iterations: int, tolerance: float
) -> tuple[float, float, bool]:
    """(Rayleigh quotient, ‖Av‖, converged) after at most `iterations` products."""
    previous = None
    quotient, norm = 0.0, 0.0
    for _ in range(iterations):
        av = apply(v)
        quotient, norm = vdot(v, av), float(torch.linalg.vector_norm(av.double()))
        if norm == 0.0:
            return 0.0, 0.0, True
        v = av / norm
        if previous is not None and abs(quotient - previous) <= tolerance * abs(quotient):
            return quotient, norm, True
        previous = quotient
    return quotient, norm, False


def _start_vector(state: State, rng: np.random.Generator) -> torch.Tensor:
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


def _check_probes(probes: int) -> None:
    if probes < 1:
        raise EngineError(f"Hutchinson needs at least 1 probe, got {probes}")


def _check_iterations(iterations: int, tolerance: float) -> None:
    if iterations < 1:
        raise EngineError(f"power iteration needs at least 1 iteration, got {iterations}")
    if not tolerance > 0:
        raise EngineError(f"the power-iteration tolerance must be positive, got {tolerance}")
