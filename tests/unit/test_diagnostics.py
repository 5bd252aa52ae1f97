"""Diagnostics against brute force: per-group gradient norms against a per-example backward loop,
curvature and quadratic forms against the exact Hessian (torch.autograd.functional.hessian on the
flattened parameters), and the predicted excessive loss against the measured one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from worker.engine.architectures import build_model
from worker.engine.curvature import curvature_subsample, group_curvature, hutchinson_trace, top_eigenvalue
from worker.engine.directional import (
    bound_terms,
    delta_norm,
    group_directional,
    parameter_delta,
    predicted_excessive_loss,
)
from worker.engine.errors import EngineError
from worker.engine.gradients import group_gradients
from worker.engine.pruning import MagnitudePruner, apply_masks

MLP_SPEC = {"name": "mlp", "in_features": 6, "hidden": [5, 4], "num_classes": 3}
CNN_SPEC = {"name": "cnn", "in_channels": 2, "image_size": 4, "channels": [3, 2], "num_classes": 3}
LINEAR_SPEC = {"name": "mlp", "in_features": 6, "hidden": [], "num_classes": 3}
INPUT_SHAPES = {"mlp": (6,), "cnn": (2, 4, 4)}
N = 41
BATCH = 4  # divides none of the group sizes below


def _model(spec: dict, seed: int = 0) -> nn.Module:
    """A float64 model in eval mode; BatchNorm gets non-trivial running statistics and affine terms."""
    torch.manual_seed(seed)
    model = build_model(spec).double()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "running_mean" in name:
                tensor.uniform_(-0.3, 0.3)
            elif "running_var" in name or (tensor.is_floating_point() and "weight" in name and tensor.dim() == 1):
                tensor.uniform_(0.5, 1.5)
    return model.eval()


def _data(spec: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, labels and two attributes with missing codes (−1) and unequal group sizes; the
    first attribute declares a 5th group that has no examples."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, *INPUT_SHAPES[spec["name"]]))
    y = rng.integers(0, spec["num_classes"], N)
    race = np.array([0] * 13 + [1] * 9 + [2] * 7 + [3] * 6 + [-1] * 6)
    sex = np.array(([0, 1, 1, -1, 0, 1, 1] * 6)[:N])
    order = rng.permutation(N)  # groups interleaved in dataset order
    return x, y, race[order], sex[order]


def _flat_grad(model: nn.Module, x: np.ndarray, y: np.ndarray, i: int) -> torch.Tensor:
    model.zero_grad()
    F.cross_entropy(model(torch.from_numpy(x[i : i + 1])), torch.from_numpy(y[i : i + 1])).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _brute_group_gradients(model, x, y, codes, n_groups, flat_mask=None) -> list[torch.Tensor]:
    """g_a by a per-example loop: zero_grad, backward, accumulate; divide by n_a; ⊙ mask."""
    per_example = [_flat_grad(model, x, y, i) for i in range(len(y))]
    result = []
    for group in range(n_groups):
        members = np.flatnonzero(codes == group)
        g = torch.zeros_like(per_example[0])
        for i in members:
            g += per_example[i]
        g = g / max(len(members), 1)
        result.append(g if flat_mask is None else g * flat_mask)
    return result


def _flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors.values()])


def _flat_mask(model: nn.Module, masks: dict) -> torch.Tensor:
    return torch.cat(
        [masks.get(n, torch.ones_like(p, dtype=torch.bool)).flatten().double() for n, p in model.named_parameters()]
    )


def _unflat(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    pieces = flat.split([p.numel() for p in model.parameters()])
    return {n: t.view_as(p) for n, t, p in zip(names, pieces, model.parameters(), strict=True)}


def _mean_loss(model: nn.Module, x: np.ndarray, y: np.ndarray, flat: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, _unflat(model, flat), (torch.from_numpy(x),)), torch.from_numpy(y))


def _exact_hessian(model: nn.Module, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    flat = _flat(dict(model.named_parameters())).detach()
    return torch.autograd.functional.hessian(lambda v: _mean_loss(model, x, y, v), flat)


def _exact_gradient(model: nn.Module, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    flat = _flat(dict(model.named_parameters())).detach().requires_grad_()
    return torch.autograd.grad(_mean_loss(model, x, y, flat), flat)[0]


def _relu_pattern(model: nn.Module, x: np.ndarray, flat: torch.Tensor) -> torch.Tensor:
    """Which ReLU inputs are positive, for every example and unit, at parameters `flat`."""
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0] > 0))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    try:
        functional_call(model, _unflat(model, flat), (torch.from_numpy(x),))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([s.flatten() for s in seen])


def _random_direction(model: nn.Module, scale: float, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in model.named_parameters()}


# --- exact group gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn-batchnorm"])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "masked"])
def test_gradient_norms_and_dots_match_a_per_example_loop(spec: dict, pruned: bool) -> None:
    model = _model(spec)
    x, y, race, sex = _data(spec)
    intersection = np.where((race >= 0) & (sex >= 0), race * 2 + sex, -1)
    masks, flat_mask = None, None
    if pruned:
        masks = MagnitudePruner("global").compute_masks(model, 0.5)
        apply_masks(model, masks)
        flat_mask = _flat_mask(model, masks)
    delta = _random_direction(model, 0.1)
    groupings, sizes = [race, sex, intersection], [5, 2, 10]
    results = group_gradients(model, None, x, y, groupings, n_groups=sizes, masks=masks, delta=delta, batch_size=BATCH)
    for result, codes, size in zip(results, groupings, sizes, strict=True):
        brute = _brute_group_gradients(model, x, y, codes, size, flat_mask)
        np.testing.assert_array_equal(result.counts, [np.sum(codes == a) for a in range(size)])
        np.testing.assert_allclose(result.norms, [float(g.norm()) for g in brute], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(result.dot, [float(g @ _flat(delta)) for g in brute], rtol=1e-5, atol=1e-12)
        assert result.passes == 1
    assert results[0].counts[4] == 0 and results[0].norms[4] == 0.0 and results[0].dot[4] == 0.0
    assert not np.isnan(results[2].norms).any()


def test_dense_parameters_are_evaluated_while_the_module_holds_the_pruned_ones() -> None:
    dense = _model(CNN_SPEC)
    x, y, race, sex = _data(CNN_SPEC)
    pruned = copy.deepcopy(dense)
    apply_masks(pruned, MagnitudePruner("global").compute_masks(pruned, 0.7))
    dense_state = {n: p.detach().clone() for n, p in dense.named_parameters()}
    (result,) = group_gradients(pruned, dense_state, x, y, [race], n_groups=[5], batch_size=BATCH)
    brute = _brute_group_gradients(dense, x, y, race, 5)
    np.testing.assert_allclose(result.norms, [float(g.norm()) for g in brute], rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in pruned.parameters())  # the module itself is left alone


def test_a_small_memory_budget_spreads_groupings_over_passes_with_the_same_norms() -> None:
    model = _model(MLP_SPEC)
    x, y, race, sex = _data(MLP_SPEC)
    results = group_gradients(model, None, x, y, [race, sex], n_groups=[5, 2], batch_size=BATCH, memory_budget_bytes=0)
    assert [r.passes for r in results] == [2, 2]
    for result, codes, size in zip(results, [race, sex], [5, 2], strict=True):
        brute = _brute_group_gradients(model, x, y, codes, size)
        np.testing.assert_allclose(result.norms, [float(g.norm()) for g in brute], rtol=1e-5, atol=1e-12)


def test_gradients_restore_train_mode_and_read_a_read_only_memmap(tmp_path) -> None:
    model = _model(CNN_SPEC)
    x, y, race, _ = _data(CNN_SPEC)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    expected = _brute_group_gradients(model, x, y, race, 4)  # eval mode: BN running statistics
    model.train()
    (result,) = group_gradients(model, None, mapped, y, [race], batch_size=BATCH)
    assert model.training
    np.testing.assert_allclose(result.norms, [float(g.norm()) for g in expected], rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groupings": [np.full(N, 7)], "n_groups": [3]}, "has code 7, but only 3 groups"),
        ({"groupings": [np.full(N, -2)]}, "codes below −1"),
        ({"groupings": [np.zeros(N - 1, np.int64)]}, "one integer code per example"),
        ({"masks": {"layers.0.weight": torch.ones(2, 2, dtype=torch.bool)}}, "mask layers.0.weight has shape"),
        ({"params": {"nope": torch.zeros(1)}}, "params name tensors the model does not have: nope"),
        ({"delta": {"layers.9.bias": torch.zeros(1)}}, "not trainable parameters"),
    ],
)
def test_bad_inputs_are_engine_errors(kwargs: dict, message: str) -> None:
    model = _model(MLP_SPEC)
    x, y, race, _ = _data(MLP_SPEC)
    arguments = {"params": None, "groupings": [race]} | kwargs
    params, groupings = arguments.pop("params"), arguments.pop("groupings")
    with pytest.raises(EngineError, match=message):
        group_gradients(model, params, x, y, groupings, **arguments)


def test_labels_outside_the_model_classes_are_engine_errors() -> None:
    model = _model(MLP_SPEC)
    x, y, race, _ = _data(MLP_SPEC)
    with pytest.raises(EngineError, match=r"class indices in \[0, 3\)"):
        group_gradients(model, None, x, y + 3, [race])


# --- curvature against the exact Hessian ---------------------------------------------------------


def _group(spec: dict = MLP_SPEC) -> tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    model = _model(spec, seed=3)
    x, y, race, _ = _data(spec, seed=3)
    return model, x, y, race, race == 0


def test_hutchinson_trace_is_within_5_percent_of_the_exact_trace() -> None:
    # Softmax regression: a PSD Hessian whose trace dominates its off-diagonal mass, so 1,000 probes
    # give a ~1% standard error and the 5% check has a 4σ margin (a ReLU MLP at initialisation has
    # an indefinite Hessian with a relative per-probe spread of ~120%: 5% would need ~10⁴ probes).
    model, x, y, _, members = _group(LINEAR_SPEC)
    exact = float(_exact_hessian(model, x[members], y[members]).trace())
    estimate = hutchinson_trace(model, None, x[members], y[members], probes=1000, seed=0)
    assert estimate.probes == 1000  # no target: every probe is drawn
    assert estimate.se < 0.0125 * exact
    assert abs(estimate.value - exact) <= 0.05 * exact


def test_hutchinson_standard_error_covers_the_error_on_an_indefinite_hessian() -> None:
    model, x, y, _, members = _group()
    exact = float(_exact_hessian(model, x[members], y[members]).trace())
    for seed in range(3):
        estimate = hutchinson_trace(model, None, x[members], y[members], probes=100, seed=seed)
        assert abs(estimate.value - exact) <= 4 * estimate.se


def test_hutchinson_with_masks_estimates_the_trace_restricted_to_kept_parameters() -> None:
    model, x, y, _, members = _group(LINEAR_SPEC)
    masks = MagnitudePruner("global").compute_masks(model, 0.6)
    keep = _flat_mask(model, masks).bool()
    hessian = _exact_hessian(model, x[members], y[members])
    exact = float(hessian[keep][:, keep].trace())
    assert exact < 0.8 * float(hessian.trace())  # the mask matters here
    estimate = hutchinson_trace(model, None, x[members], y[members], masks=masks, probes=1000, seed=0)
    assert estimate.se < 0.0125 * exact
    assert abs(estimate.value - exact) <= 0.05 * exact


def test_lanczos_finds_the_top_eigenvalue_and_its_bound_covers_the_error() -> None:
    model, x, y, _, members = _group()
    exact = float(torch.linalg.eigvalsh(_exact_hessian(model, x[members], y[members]))[-1])
    estimate = top_eigenvalue(model, None, x[members], y[members], seed=0)  # default: at most 20 steps
    assert estimate.converged and estimate.products <= 20
    assert estimate.value == pytest.approx(exact, rel=1e-3)
    # A Ritz value never exceeds λ_max, and the residual bound reaches it.
    assert estimate.value <= exact + 1e-12
    assert exact - estimate.value <= estimate.error_bound + 1e-12


def test_lanczos_stopped_early_still_bounds_its_error() -> None:
    # What the residual bound guarantees before convergence: SOME eigenvalue lies within it (not yet λ_max).
    model, x, y, _, members = _group(CNN_SPEC)
    eigenvalues = torch.linalg.eigvalsh(_exact_hessian(model, x[members], y[members])).numpy()
    for steps in (2, 3, 5):
        estimate = top_eigenvalue(model, None, x[members], y[members], steps=steps, tolerance=1e-9, seed=1)
        assert estimate.products == steps and not estimate.converged
        assert estimate.value <= eigenvalues[-1] + 1e-12
        assert np.abs(eigenvalues - estimate.value).min() <= estimate.error_bound + 1e-12


def test_masked_top_eigenvalue_is_that_of_the_hessian_restricted_to_kept_parameters() -> None:
    model, x, y, _, members = _group()
    masks = MagnitudePruner("global").compute_masks(model, 0.6)
    keep = _flat_mask(model, masks).bool()
    hessian = _exact_hessian(model, x[members], y[members])
    restricted = float(torch.linalg.eigvalsh(hessian[keep][:, keep])[-1])
    assert restricted < float(torch.linalg.eigvalsh(hessian)[-1]) * 0.99  # the mask matters here
    estimate = top_eigenvalue(model, None, x[members], y[members], masks=masks, steps=50, seed=0)
    assert estimate.value == pytest.approx(restricted, rel=1e-3)


def _negative_curvature_chain() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """A 1-1-1 ReLU chain, all units active, whose output bias makes the label (class 1) nearly
    impossible: p₁ ≈ e⁻⁷, so H ≈ L'(d)·∇²d with L' ≈ −1 and the Gauss-Newton part ≈ 0, where
    d = z₁ − z₀ is multilinear in the weights. ∇²d (sign-flipped on u₀) is a non-negative matrix
    whose graph has a triangle (w₁, w₂, u₁), so its Perron root is its unique largest-|λ| eigenvalue:
    H's largest-magnitude eigenvalue is negative, which power iteration would have found first."""
    model = build_model({"name": "mlp", "in_features": 1, "hidden": [1, 1], "num_classes": 2}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.layers[0].weight.fill_(1.0)
        model.layers[2].weight.fill_(1.0)
        model.layers[4].weight[1] = 1.0
        model.layers[4].bias[1] = -8.0
    return model, np.array([[0.5], [1.0], [1.5], [2.0]]), np.ones(4, np.int64)


def test_a_dominant_negative_eigenvalue_does_not_hide_the_top_one() -> None:
    model, x, y = _negative_curvature_chain()
    eigenvalues = torch.linalg.eigvalsh(_exact_hessian(model, x, y))
    assert -eigenvalues[0] > 1.3 * eigenvalues[-1] > 0  # largest |λ| is negative, λ_max positive
    estimate = top_eigenvalue(model, None, x, y, seed=0)
    assert estimate.value == pytest.approx(float(eigenvalues[-1]), rel=1e-3)


def test_group_curvature_uses_the_documented_subsample_and_seeds() -> None:
    model, x, y, race, _ = _group()
    result = group_curvature(model, None, x, y, race, 5, probes=400, lanczos_steps=50, max_examples=8, seed=11)
    np.testing.assert_array_equal(result.counts, [13, 9, 7, 6, 0])
    np.testing.assert_array_equal(result.examples_used, [8, 8, 7, 6, 0])
    for group in range(4):
        members = np.flatnonzero(race == group)
        rows = members[curvature_subsample(len(members), 8, (11, group))]
        hessian = _exact_hessian(model, x[rows], y[rows])
        assert abs(result.trace[group] - float(hessian.trace())) <= 4 * result.trace_se[group]
        assert result.top_eigenvalue[group] == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-3)
        assert result.eigenvalue_converged[group]
        # The per-group seed reproduces the standalone functions exactly.
        standalone = hutchinson_trace(
            model, None, x[members], y[members], probes=400, lanczos_steps=50, max_examples=8, seed=(11, group)
        )
        assert (standalone.value, standalone.se) == (result.trace[group], result.trace_se[group])
    assert (result.trace[4], result.trace_se[4], result.top_eigenvalue[4]) == (0.0, 0.0, 0.0)


def test_deflating_the_lanczos_basis_keeps_the_trace_and_shrinks_its_error() -> None:
    # An indefinite Hessian of 74 parameters: the 13 vectors Lanczos builds before λ_max converges carry the
    # largest |λ|, and with them most of the spread of vᵀHv.
    model, x, y, _, members = _group(MLP_SPEC)
    exact = float(_exact_hessian(model, x[members], y[members]).trace())
    plain = hutchinson_trace(model, None, x[members], y[members], probes=200, seed=1)
    deflated = hutchinson_trace(model, None, x[members], y[members], probes=200, lanczos_steps=20, seed=1)
    assert deflated.deflated > 5 and plain.deflated == 0
    assert deflated.se < 0.5 * plain.se
    assert abs(deflated.value - exact) <= 4 * deflated.se


def test_a_lanczos_basis_spanning_the_whole_space_gives_the_exact_trace() -> None:
    # 21 parameters, a Hessian of rank ≤ 14 (3 classes): the Krylov space closes within 21 steps, and the
    # basis then holds the whole range of H, so nothing is left to the probes.
    model, x, y, _, members = _group(LINEAR_SPEC)
    exact = float(_exact_hessian(model, x[members], y[members]).trace())
    estimate = hutchinson_trace(model, None, x[members], y[members], probes=8, lanczos_steps=21, tolerance=1e-14)
    assert estimate.deflated <= 21
    assert estimate.value == pytest.approx(exact, rel=1e-9)
    assert estimate.se <= 1e-9 * exact


def test_hutchinson_stops_at_the_target_relative_standard_error() -> None:
    model, x, y, _, members = _group(LINEAR_SPEC)
    full = hutchinson_trace(model, None, x[members], y[members], probes=400, seed=4)
    adaptive = hutchinson_trace(model, None, x[members], y[members], probes=400, target_rse=0.05, seed=4)
    assert 6 <= adaptive.probes < 400  # stopped early, after the minimum
    assert adaptive.se <= 0.05 * abs(adaptive.value)
    # The same probe stream: the adaptive estimate is the full one cut short.
    assert abs(adaptive.value - full.value) <= 4 * adaptive.se


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn-batchnorm"])
def test_stated_errors_cover_the_exact_hessian_figures_at_the_audit_defaults(spec: dict) -> None:
    """With the audit's adaptive trace and Lanczos, the stated 95% t-interval of the trace covers the exact
    trace of the group's subsample Hessian for at least 90% of 4 groups × 10 seeds (measured: 95–97% over 20
    seeds), and every exact λ_max lies in [estimate, estimate + bound]."""
    from scipy.stats import t as student_t

    model = _model(spec, seed=5)
    x, y, race, _ = _data(spec, seed=5)
    missed = 0
    for seed in range(10):
        result = group_curvature(model, None, x, y, race, 5, target_rse=0.1, max_examples=8, seed=seed)
        for group in range(4):
            members = np.flatnonzero(race == group)
            rows = members[curvature_subsample(len(members), 8, (seed, group))]
            hessian = _exact_hessian(model, x[rows], y[rows])
            half_width = student_t.ppf(0.975, result.trace_probes[group] - 1) * result.trace_se[group]
            missed += abs(result.trace[group] - float(hessian.trace())) > half_width
            top = float(torch.linalg.eigvalsh(hessian)[-1])
            assert result.top_eigenvalue[group] <= top + 1e-12
            assert top - result.top_eigenvalue[group] <= result.top_eigenvalue_error[group] + 1e-12
    assert missed <= 4


def test_curvature_is_deterministic_for_a_seed_and_moves_with_it() -> None:
    model, x, y, race, _ = _group()
    first = group_curvature(model, None, x, y, race, 4, max_examples=5, seed=7)
    again = group_curvature(model, None, x, y, race, 4, max_examples=5, seed=7)
    other = group_curvature(model, None, x, y, race, 4, max_examples=5, seed=8)
    for field in ("trace", "trace_se", "trace_probes", "top_eigenvalue", "top_eigenvalue_error", "examples_used"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert not np.array_equal(first.trace, other.trace)


def test_curvature_batched_without_a_retained_graph_matches_one_batch() -> None:
    model, x, y, _, members = _group()
    one_batch = hutchinson_trace(model, None, x[members], y[members], probes=8, seed=2, batch_size=512)
    batched = hutchinson_trace(model, None, x[members], y[members], probes=8, seed=2, batch_size=3)
    np.testing.assert_allclose([batched.value, batched.se], [one_batch.value, one_batch.se], rtol=1e-10)


# --- directional derivatives and the predicted excessive loss ------------------------------------


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn-batchnorm"])
def test_quadratic_forms_and_dots_over_whole_groups_equal_the_exact_hessian_and_gradient(spec: dict) -> None:
    model = _model(spec)
    x, y, race, sex = _data(spec)
    delta = _random_direction(model, 0.3)
    v = _flat(delta)
    results = group_directional(model, None, x, y, [race, sex], delta, n_groups=[5, 2], batch_size=BATCH)
    for result, codes, size in zip(results, [race, sex], [5, 2], strict=True):
        np.testing.assert_array_equal(result.examples_used, result.counts)
        for group in range(size):
            members = codes == group
            if not members.any():
                assert result.counts[group] == 0 and result.quadratic[group] == result.dot[group] == 0
                continue
            hessian = _exact_hessian(model, x[members], y[members])
            gradient = _exact_gradient(model, x[members], y[members])
            assert result.quadratic[group] == pytest.approx(float(v @ hessian @ v), rel=1e-6)
            assert result.dot[group] == pytest.approx(float(gradient @ v), rel=1e-6)
            assert result.quadratic_se[group] == result.dot_se[group] == result.predicted_se[group] == 0.0


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn-batchnorm"])
def test_subsampled_directional_terms_are_those_of_the_subsample_and_their_errors_cover_the_group(spec: dict) -> None:
    model = _model(spec, seed=2)
    x, y, race, _ = _data(spec, seed=2)
    delta = _random_direction(model, 0.3, seed=3)
    v = _flat(delta)
    missed = 0
    for seed in range(5):
        (result,) = group_directional(model, None, x, y, [race], delta, n_groups=[5], max_examples=4, seed=seed)
        np.testing.assert_array_equal(result.examples_used, [4, 4, 4, 4, 0])
        for group in range(4):
            members = np.flatnonzero(race == group)
            rows = members[curvature_subsample(len(members), 4, (seed, 0, group))]
            assert result.quadratic[group] == pytest.approx(
                float(v @ _exact_hessian(model, x[rows], y[rows]) @ v), rel=1e-6
            )
            whole = _exact_hessian(model, x[members], y[members])
            missed += abs(result.quadratic[group] - float(v @ whole @ v)) > 3 * result.quadratic_se[group]
    assert missed <= 2  # of 20 intervals at ±3 standard errors (4 examples per mean: heavy-tailed t)


def test_directional_terms_with_masks_use_the_masked_direction() -> None:
    model, x, y, _, members = _group()
    masks = MagnitudePruner("global").compute_masks(model, 0.5)
    keep = _flat_mask(model, masks)
    delta = _random_direction(model, 0.3)
    v = _flat(delta) * keep
    exact = float(v @ _exact_hessian(model, x[members], y[members]) @ v)
    (result,) = group_directional(model, None, x, y, [members.astype(np.int64) - 1], delta, n_groups=[1], masks=masks)
    assert result.quadratic[0] == pytest.approx(exact, rel=1e-6)


def test_predicted_excessive_loss_matches_the_measured_one_to_third_order() -> None:
    model = _model(MLP_SPEC, seed=4)
    x, y, race, _ = _data(MLP_SPEC, seed=4)
    theta = _flat(dict(model.named_parameters())).detach()
    direction = _random_direction(model, 1.0, seed=9)
    unit = float(theta.norm()) / delta_norm(direction)
    errors = []
    for scale in (1e-3, 5e-4):
        delta = {n: t * scale * unit for n, t in direction.items()}
        assert delta_norm(delta) == pytest.approx(scale * float(theta.norm()))
        shifted = theta + _flat(delta)
        # Precondition: δ is small enough that no ReLU changes state (the loss is smooth along it).
        assert torch.equal(_relu_pattern(model, x, theta), _relu_pattern(model, x, shifted))
        (result,) = group_directional(model, None, x, y, [race], delta, n_groups=[4], batch_size=BATCH)
        predicted = predicted_excessive_loss(result.dot, result.quadratic)
        measured = np.array(
            [
                float(
                    _mean_loss(model, x[race == a], y[race == a], shifted)
                    - _mean_loss(model, x[race == a], y[race == a], theta)
                )
                for a in range(4)
            ]
        )
        assert np.all(np.abs(predicted - measured) < 0.01 * np.abs(measured))
        errors.append(np.abs(predicted - measured))
    # Third-order remainder: halving δ divides the error by about 2³ = 8.
    assert np.all((errors[0] / errors[1] > 6) & (errors[0] / errors[1] < 10))


def test_parameter_delta_norm_and_bound_terms_by_hand() -> None:
    dense = {"w": torch.tensor([3.0, -1.0, 2.0]), "b": torch.tensor([0.5])}
    pruned = {"w": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([0.5])}
    delta = parameter_delta(dense, pruned)
    torch.testing.assert_close(delta["w"], torch.tensor([0.0, 1.0, -2.0]))
    assert delta_norm(delta) == pytest.approx(5**0.5)
    linear, quadratic = bound_terms(np.array([0.2, 1.0]), np.array([4.0, -1.0]), 5**0.5)
    np.testing.assert_allclose(linear, [0.2 * 5**0.5, 5**0.5])
    np.testing.assert_allclose(quadratic, [0.5 * 4.0 * 5, -0.5 * 5])
    np.testing.assert_allclose(predicted_excessive_loss(np.array([0.1, -0.2]), np.array([0.4, 1.0])), [0.3, 0.3])
    with pytest.raises(EngineError, match="differ in names"):
        parameter_delta(dense, {"w": pruned["w"]})
