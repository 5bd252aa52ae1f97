"""Curvature of every group's mean loss on a capped, seeded subsample, from Hessian-vector products: the top
eigenvalue by Lanczos with full reorthogonalisation, with the residual bound of its Ritz value as its error, and
the Hessian trace by Hutchinson's estimator deflated by that Lanczos basis Q — Tr(H) = Tr(QᵀHQ) (the sum of the
Lanczos α's, exact) + Tr((I−QQᵀ)H(I−QQᵀ)) (Hutchinson on probes projected off Q) — stopping adaptively once its
standard error falls to a target share of the estimate. A trained net's Hessian has a few dominant eigenvalues,
which make plain vᵀHv heavy-tailed; removing them leaves a residual of far smaller spread, at no extra Hessian
products (the Lanczos run is needed for λ_max anyway). Definitions: docs/METHODS.md §11.

Measured on this 2-core CPU (ResNet-20 CIFAR layout, 512 images): one Hessian-vector product costs 5–9
forward passes; batching 4–8 probes through one vmapped backward (`is_grads_batched`) was 1.2–1.4× slower
than one product at a time, so probes run one by one. Lanczos needs no shift for a negative top eigenvalue
and reaches a 1e-3 residual bound in fewer products than power iteration needed to settle.

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
    check_batch_size,
    check_data,
    check_groupings,
    eval_mode,
    load_batch,
    vdot,
)
from worker.engine.errors import EngineError

# Adaptive stopping looks at the standard error only from this many probes on: below it the spread of the
# samples is itself too uncertain to stop on.
MIN_PROBES = 6


@dataclass(frozen=True)
class TraceEstimate:
    value: float  # Tr(QᵀHQ) + the Hutchinson mean of vᵀ(I−QQᵀ)H(I−QQᵀ)v over the probes (no Q: plain Hutchinson)
    se: float  # std(ddof=1)/√probes of the Hutchinson part (the deflated part is exact)
    probes: int  # probes drawn: the adaptive stop, or the cap
    deflated: int = 0  # dimension of the Lanczos basis Q taken out before the probes


@dataclass(frozen=True)
class _Deflation:
    """An orthonormal basis Q (rows, in the mask's subspace) and Tr(QᵀHQ)."""

    basis: torch.Tensor  # (k, numel)
    trace: float

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return v - self.basis.T @ (self.basis @ v)


@dataclass(frozen=True)
class EigenvalueEstimate:
    value: float  # the largest Ritz value: never above λ_max (Cauchy interlacing)
    error_bound: float  # ‖Hy − θy‖ = |β_k s_k|: an eigenvalue of H lies within this of `value`
    converged: bool  # error_bound ≤ tolerance·|value| within the step cap (or the Krylov space closed)
    products: int  # Hessian-vector products used


@dataclass(frozen=True)
class GroupCurvature:
    """Hessian trace and top eigenvalue of each group's mean loss on its capped subsample."""

    trace: np.ndarray  # float64 Hutchinson estimate of Tr(H_a) (restricted to the mask)
    trace_se: np.ndarray  # float64 its standard error
    trace_probes: np.ndarray  # int64 probes the adaptive stop used
    top_eigenvalue: np.ndarray  # float64 λ_max(H_a) by Lanczos (restricted to the mask)
    top_eigenvalue_error: np.ndarray  # float64 the Lanczos residual bound of that estimate
    eigenvalue_converged: np.ndarray  # bool: the bound reached the tolerance within the step cap
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


@dataclass(frozen=True)
class GroupSamples:
    """The examples the per-example estimates (Gauss–Newton trace, directional terms) use."""

    members: list[list[np.ndarray]]  # per grouping k, per group code a: sorted example indices
    rows: np.ndarray  # their union, sorted: an example in several groups' subsamples is computed once


def group_subsamples(
    codes: Sequence[np.ndarray], sizes: Sequence[int], max_examples: int | None, seed: int
) -> GroupSamples:
    """Per grouping k and group a, the `curvature_subsample` of seed (seed, k, a) of the group's examples (all
    of them when `max_examples` is None); empty for groups without examples."""
    members = []
    for k, (grouping, size) in enumerate(zip(codes, sizes, strict=True)):
        order = np.argsort(grouping, kind="stable")  # dataset order within each group
        bounds = np.searchsorted(grouping[order], np.arange(size + 1))
        per_group = []
        for group in range(size):
            rows = order[bounds[group] : bounds[group + 1]]
            if max_examples is not None and len(rows):
                rows = rows[curvature_subsample(len(rows), max_examples, (seed, k, group))]
            per_group.append(rows)
        members.append(per_group)
    everything = [rows for per_group in members for rows in per_group]
    return GroupSamples(members, np.unique(np.concatenate(everything)) if everything else np.zeros(0, np.int64))


def hutchinson_trace(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    *,
    masks: Tensors | None = None,
    probes: int = 32,
    target_rse: float = 0.0,
    lanczos_steps: int = 0,
    tolerance: float = 1e-3,
    max_examples: int = 512,
    seed: int | Sequence[int] = 0,
    batch_size: int = 512,
    device: Device = "cpu",
) -> TraceEstimate:
    """Tr(H) of the mean loss over (x, y) (one group) restricted to the mask, by Hutchinson's estimator
    (1/m) Σ_j v_jᵀHv_j over Rademacher v_j ⊙ mask, on the `curvature_subsample` of at most `max_examples`
    examples; with `lanczos_steps` > 0, deflated by the basis of the Lanczos run `top_eigenvalue` makes with
    the same arguments (as `group_curvature` does). Draws at most `probes`; with `target_rse` > 0 it stops
    (after MIN_PROBES) as soon as the standard error is at most `target_rse`·|estimate|. The first-order graph
    is built once and reused by every probe when the subsample fits one batch of `batch_size`."""
    _check_probes(probes, target_rse)
    check_data(x, y)
    state = State(model, params, masks)
    rows = curvature_subsample(len(y), max_examples, seed)
    _, probe_rng, start_rng = _streams(seed)
    with eval_mode(model):
        operator = _HessianOperator(state, x, y, rows, batch_size, device)
        deflation = None
        if lanczos_steps > 0:
            _check_steps(lanczos_steps, tolerance)
            _, deflation = _lanczos_top(operator, lanczos_steps, tolerance, start_rng)
        return _hutchinson(operator, probes, target_rse, probe_rng, deflation)


def top_eigenvalue(
    model: nn.Module,
    params: Tensors | None,
    x: np.ndarray,
    y: np.ndarray,
    *,
    masks: Tensors | None = None,
    steps: int = 20,
    tolerance: float = 1e-3,
    max_examples: int = 512,
    seed: int | Sequence[int] = 0,
    batch_size: int = 512,
    device: Device = "cpu",
) -> EigenvalueEstimate:
    """λ_max(H) (the largest, signed) of the mean loss over (x, y) restricted to the mask, by at most
    `steps` Lanczos steps from a seeded start vector, stopping once the residual bound is at most
    `tolerance`·|λ|; on the `curvature_subsample` (docs/METHODS.md §11)."""
    _check_steps(steps, tolerance)
    check_data(x, y)
    state = State(model, params, masks)
    rows = curvature_subsample(len(y), max_examples, seed)
    with eval_mode(model):
        operator = _HessianOperator(state, x, y, rows, batch_size, device)
        return _lanczos_top(operator, steps, tolerance, _streams(seed)[2])[0]


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
    target_rse: float = 0.0,
    lanczos_steps: int = 20,
    tolerance: float = 1e-3,
    max_examples: int = 512,
    seed: int = 0,
    batch_size: int = 512,
    device: Device = "cpu",
) -> GroupCurvature:
    """Lanczos top eigenvalue (± residual bound) and deflated Hutchinson trace (± standard error) of every group's
    mean-loss Hessian, sharing one subsample, one first-order graph and the Lanczos basis per group. Group a uses
    seed (seed, a), so `hutchinson_trace(model, params, x[codes == a], y[codes == a], seed=(seed, a),
    lanczos_steps=lanczos_steps, ...)` gives the same trace. Empty groups get zeros and examples_used == 0. Only the
    subsample is read from x."""
    _check_probes(probes, target_rse)
    _check_steps(lanczos_steps, tolerance)
    (codes,), (size,) = check_groupings([codes], [n_groups], len(x))
    check_data(x, y)
    state = State(model, params, masks)
    traces: dict[int, TraceEstimate] = {}
    tops: dict[int, EigenvalueEstimate] = {}
    used = np.zeros(size, dtype=np.int64)
    counts = np.bincount(codes[codes >= 0], minlength=size).astype(np.int64)
    with eval_mode(model):
        for group in map(int, np.flatnonzero(counts)):
            members = np.flatnonzero(codes == group)
            _, probe_rng, start_rng = _streams((seed, group))
            rows = members[curvature_subsample(len(members), max_examples, (seed, group))]
            operator = _HessianOperator(state, x, y, rows, batch_size, device)
            tops[group], deflation = _lanczos_top(operator, lanczos_steps, tolerance, start_rng)
            traces[group] = _hutchinson(operator, probes, target_rse, probe_rng, deflation)
            used[group] = len(rows)
            del operator  # frees the retained graph before the next group builds its own

    def column(estimates: dict, name: str, dtype: type = np.float64) -> np.ndarray:
        return np.array([getattr(estimates[a], name) if a in estimates else 0 for a in range(size)], dtype=dtype)

    return GroupCurvature(
        trace=column(traces, "value"),
        trace_se=column(traces, "se"),
        trace_probes=column(traces, "probes", np.int64),
        top_eigenvalue=column(tops, "value"),
        top_eigenvalue_error=column(tops, "error_bound"),
        eigenvalue_converged=column(tops, "converged", bool),
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


def _hutchinson(
    operator: _HessianOperator,
    probes: int,
    target_rse: float,
    rng: np.random.Generator,
    deflation: _Deflation | None = None,
) -> TraceEstimate:
    samples: list[float] = []
    numel, state = operator.state.numel, operator.state
    exact = deflation.trace if deflation is not None else 0.0
    for _ in range(probes):
        signs = rng.integers(0, 2, size=numel, dtype=np.int8) * 2 - 1
        v = torch.from_numpy(signs).to(device=state.device, dtype=state.dtype)
        if state.flat_mask is not None:
            v = v * state.flat_mask
        if deflation is not None:
            v = deflation.project(v)
        samples.append(vdot(v, operator(v)))
        if target_rse > 0 and len(samples) >= MIN_PROBES:
            mean, se = _mean_se(samples)
            if se <= target_rse * abs(exact + mean):
                break
    mean, se = _mean_se(samples)
    return TraceEstimate(exact + mean, se, len(samples), len(deflation.basis) if deflation is not None else 0)


def _mean_se(samples: list[float]) -> tuple[float, float]:
    values = np.asarray(samples)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def _lanczos_top(
    operator: _HessianOperator, steps: int, tolerance: float, rng: np.random.Generator
) -> tuple[EigenvalueEstimate, _Deflation]:
    """Lanczos on P H P from a masked Gaussian start: after each product, the largest eigenvalue θ of the
    tridiagonal matrix and its residual bound |β_k s_k|; stops once the bound is within `tolerance`·|θ|.
    Every new vector is reorthogonalised against the whole basis (k ≤ steps vectors of the model's size), so
    no spurious copies of converged eigenvalues appear. Returns the basis too, with Tr(QᵀHQ) = Σ α."""
    basis = [_start_vector(operator.state, rng)]
    alphas: list[float] = []
    betas: list[float] = []
    theta, bound = 0.0, math.inf
    for step in range(1, steps + 1):
        w = operator(basis[-1])
        alphas.append(vdot(basis[-1], w))
        for q in basis:  # full reorthogonalisation (it also removes the α and β components)
            w = w - vdot(q, w) * q
        beta = float(torch.linalg.vector_norm(w.double()))
        ritz_values, ritz_vectors = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        theta, bound = float(ritz_values[-1]), beta * abs(float(ritz_vectors[-1, -1]))
        closed = beta <= 1e-12 * max(1.0, max(abs(a) for a in alphas))  # the Krylov space is invariant
        if closed or bound <= tolerance * abs(theta):
            return EigenvalueEstimate(theta, bound, True, step), _Deflation(torch.stack(basis), sum(alphas))
        betas.append(beta)
        basis.append(w / beta)
    # The last vector's α was never computed: deflate the `steps` vectors whose α's are known.
    return EigenvalueEstimate(theta, bound, False, steps), _Deflation(torch.stack(basis[:steps]), sum(alphas))


def _start_vector(state: State, rng: np.random.Generator) -> torch.Tensor:
    v = torch.from_numpy(rng.standard_normal(state.numel)).to(device=state.device, dtype=state.dtype)
    if state.flat_mask is not None:
        v = v * state.flat_mask
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > 0 else v


def _streams(seed: int | Sequence[int]) -> tuple[np.random.Generator, ...]:
    """Independent Generators for the subsample, the Hutchinson probes and the Lanczos start vector, so each
    function draws the same numbers whichever others run."""
    entropy = [seed] if isinstance(seed, int | np.integer) else list(seed)
    if any(int(s) < 0 for s in entropy):
        raise EngineError(f"seeds must be non-negative integers, got {seed}")
    return tuple(np.random.default_rng(child) for child in np.random.SeedSequence([int(s) for s in entropy]).spawn(3))


def _check_probes(probes: int, target_rse: float) -> None:
    if probes < 2:
        raise EngineError(f"Hutchinson needs at least 2 probes to state its standard error, got {probes}")
    if target_rse < 0:
        raise EngineError(f"the target relative standard error must be ≥ 0, got {target_rse}")


def _check_steps(steps: int, tolerance: float) -> None:
    if steps < 1:
        raise EngineError(f"Lanczos needs at least 1 step, got {steps}")
    if not tolerance > 0:
        raise EngineError(f"the Lanczos tolerance must be positive, got {tolerance}")
