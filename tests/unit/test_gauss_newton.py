"""The Gauss–Newton trace estimate against the exact Gauss–Newton matrix (1/n) Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i,
built from each example's logit Jacobian (torch.autograd.functional.jacobian on the flattened parameters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t
from torch.func import functional_call

from tests.unit.test_diagnostics import CNN_SPEC, MLP_SPEC, _data, _flat, _flat_mask, _model, _unflat
from worker.engine.curvature import curvature_subsample
from worker.engine.gauss_newton import group_gauss_newton_trace
from worker.engine.pruning import MagnitudePruner


def _exact_gauss_newton(model, x: np.ndarray, keep: torch.Tensor | None = None) -> float:
    flat = _flat(dict(model.named_parameters())).detach()

    def logits(v: torch.Tensor) -> torch.Tensor:
        return functional_call(model, _unflat(model, v), (torch.from_numpy(x),))

    jacobian = torch.autograd.functional.jacobian(logits, flat)  # (n, C, P)
    if keep is not None:
        jacobian = jacobian * keep
    p = torch.softmax(logits(flat), 1).detach()
    curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, C, C)
    per_example = torch.einsum("ncp,ncd,ndp->n", jacobian, curvature, jacobian)
    return float(per_example.mean())


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn-batchnorm"])
def test_stated_errors_cover_the_exact_gauss_newton_trace(spec: dict) -> None:
    model = _model(spec, seed=6)
    x, y, race, sex = _data(spec, seed=6)
    missed = intervals = 0
    for seed in range(8):
        results = group_gauss_newton_trace(model, None, x, y, [race, sex], n_groups=[5, 2], max_examples=8, seed=seed)
        for k, (codes, size) in enumerate(((race, 5), (sex, 2))):
            result = results[k]
            for group in range(size):
                members = np.flatnonzero(codes == group)
                if len(members) == 0:
                    assert result.trace[group] == result.examples_used[group] == 0
                    continue
                rows = members[curvature_subsample(len(members), 8, (seed, k, group))]
                assert result.examples_used[group] == len(rows)
                exact = _exact_gauss_newton(model, x[rows])
                half_width = student_t.ppf(0.975, len(rows) - 1) * result.trace_se[group]
                missed += abs(result.trace[group] - exact) > half_width
                intervals += 1
    # The estimate is unbiased for the subsample's exact trace: the 95% intervals cover it ≥ 85% of the time.
    assert missed <= 0.15 * intervals


def test_the_mean_over_many_label_draws_converges_to_the_exact_trace_and_masks_restrict_it() -> None:
    model = _model(MLP_SPEC, seed=7)
    x, y, race, _ = _data(MLP_SPEC, seed=7)
    masks = MagnitudePruner("global").compute_masks(model, 0.5)
    members = np.flatnonzero(race == 0)
    for group_masks, keep in ((None, None), (masks, _flat_mask(model, masks))):
        exact = _exact_gauss_newton(model, x[members], keep)
        draws = [
            group_gauss_newton_trace(model, None, x, y, [race], n_groups=[5], masks=group_masks, seed=seed)[0].trace[0]
            for seed in range(200)
        ]
        assert np.mean(draws) == pytest.approx(exact, rel=0.05)
    assert _exact_gauss_newton(model, x[members], _flat_mask(model, masks)) < 0.9 * _exact_gauss_newton(
        model, x[members]
    )
