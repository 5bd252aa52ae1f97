"""Unstructured pruning against exact counts and a plain-Python sorted() reference: magnitude and random
pruners, per-layer ratios, the default dense layers, and masks kept through optimizer steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from worker.engine.architectures import build_model
from worker.engine.errors import EngineError
from worker.engine.pruning import (
    MagnitudePruner,
    MaskKeeper,
    RandomPruner,
    apply_masks,
    default_dense_layers,
    prunable_weights,
    sparsity,
)

RATIOS = [0.0, 0.1, 0.33, 0.5, 0.77, 0.9, 0.99]
CNN_SPEC = {"name": "cnn", "in_channels": 3, "image_size": 8, "channels": [4, 6], "num_classes": 5}
MLP_SPEC = {"name": "mlp", "in_features": 9, "hidden": [7, 5], "num_classes": 3}


def _seeded(spec: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():  # non-trivial BN state, so "untouched" is a real check
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and "weight" not in name:
                tensor.uniform_(0.5, 1.5)
    return model


def _with_ties_and_zeros(spec: dict) -> nn.Module:
    """Weights drawn from {-2, -1, 0, 1, 2}, with every layer's first third already zero."""
    model = _seeded(spec)
    with torch.no_grad():
        for weight in prunable_weights(model).values():
            weight.copy_(torch.randint(-2, 3, weight.shape).float())
            weight.view(-1)[: weight.numel() // 3] = 0
    return model


def _reference_removed(magnitudes: list[float], n_removed: int) -> set[int]:
    """Indices of the n smallest magnitudes, ties to the lower index: sorted() on (|w|, index)."""
    return set(sorted(range(len(magnitudes)), key=lambda i: (magnitudes[i], i))[:n_removed])


def test_prunable_weights_are_linear_and_conv_weights_only() -> None:
    cnn_weights = ["features.0.weight", "features.4.weight", "classifier.weight"]
    assert list(prunable_weights(_seeded(CNN_SPEC))) == cnn_weights
    mlp_weights = prunable_weights(_seeded(MLP_SPEC), ignored_layers=["layers.4"])
    assert list(mlp_weights) == ["layers.0.weight", "layers.2.weight"]


def test_a_misspelt_ignored_layer_is_an_error() -> None:
    with pytest.raises(EngineError, match="ignored layers classifer are not prunable layers"):
        prunable_weights(_seeded(CNN_SPEC), ignored_layers=["classifer"])


@pytest.mark.parametrize("model_factory", [_seeded, _with_ties_and_zeros], ids=["random", "ties-and-zeros"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_layerwise_removes_exactly_round_ratio_numel_per_layer(model_factory, ratio: float) -> None:
    model = model_factory(CNN_SPEC)
    original = {name: w.detach().clone() for name, w in prunable_weights(model).items()}
    masks = MagnitudePruner(scope="layerwise").compute_masks(model, ratio)
    apply_masks(model, masks)
    for name, weight in prunable_weights(model).items():
        assert int((~masks[name]).sum()) == round(ratio * weight.numel())
        assert torch.equal(weight, torch.where(masks[name], original[name], 0.0))


@pytest.mark.parametrize("model_factory", [_seeded, _with_ties_and_zeros], ids=["random", "ties-and-zeros"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_global_removes_exactly_round_ratio_total(model_factory, ratio: float) -> None:
    model = model_factory(CNN_SPEC)
    total = sum(w.numel() for w in prunable_weights(model).values())
    masks = MagnitudePruner(scope="global").compute_masks(model, ratio)
    assert sum(int((~mask).sum()) for mask in masks.values()) == round(ratio * total)


@pytest.mark.parametrize("ratio", RATIOS)
def test_zero_counts_after_apply_are_exact_for_random_weights(ratio: float) -> None:
    for scope in ("layerwise", "global"):
        model = _seeded(CNN_SPEC)
        weights = prunable_weights(model)
        masks = MagnitudePruner(scope=scope).compute_masks(model, ratio)
        apply_masks(model, masks)
        zeros = {name: int((w == 0).sum()) for name, w in weights.items()}
        if scope == "layerwise":
            assert zeros == {name: round(ratio * w.numel()) for name, w in weights.items()}
        else:
            assert sum(zeros.values()) == round(ratio * sum(w.numel() for w in weights.values()))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_global_threshold_every_kept_magnitude_is_at_least_every_removed(ratio: float) -> None:
    model = _with_ties_and_zeros(CNN_SPEC)
    masks = MagnitudePruner(scope="global").compute_masks(model, ratio)
    weights = prunable_weights(model)
    kept = torch.cat([w.detach().abs()[masks[n]] for n, w in weights.items()])
    removed = torch.cat([w.detach().abs()[~masks[n]] for n, w in weights.items()])
    assert kept.min() >= removed.max()


@pytest.mark.parametrize("model_factory", [_seeded, _with_ties_and_zeros], ids=["random", "ties-and-zeros"])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_masks_equal_a_sorted_reference(model_factory, ratio: float) -> None:
    model = model_factory(MLP_SPEC)
    weights = {name: w.detach().flatten().tolist() for name, w in prunable_weights(model).items()}

    layerwise = MagnitudePruner(scope="layerwise").compute_masks(model, ratio)
    for name, values in weights.items():
        removed = _reference_removed([abs(v) for v in values], round(ratio * len(values)))
        assert set(torch.nonzero(~layerwise[name].flatten()).flatten().tolist()) == removed

    pooled = [abs(v) for values in weights.values() for v in values]  # in module order
    removed = _reference_removed(pooled, round(ratio * len(pooled)))
    global_masks = MagnitudePruner(scope="global").compute_masks(model, ratio)
    flat_mask = torch.cat([global_masks[name].flatten() for name in weights])
    assert set(torch.nonzero(~flat_mask).flatten().tolist()) == removed


def test_equal_weights_are_removed_in_index_order() -> None:
    model = nn.Sequential(nn.Linear(4, 5))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    mask = MagnitudePruner(scope="layerwise").compute_masks(model, 0.4)["0.weight"]
    assert mask.flatten().tolist() == [False] * 8 + [True] * 12


def test_ratio_zero_keeps_everything() -> None:
    model = _with_ties_and_zeros(CNN_SPEC)
    for scope in ("global", "layerwise"):
        masks = MagnitudePruner(scope=scope).compute_masks(model, 0.0)
        assert all(bool(mask.all()) for mask in masks.values())


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_an_error(ratio: float) -> None:
    with pytest.raises(EngineError, match=r"pruning ratio must be in \[0, 1\)"):
        MagnitudePruner().compute_masks(_seeded(MLP_SPEC), ratio)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_biases_batchnorm_and_ignored_layers_are_untouched(scope: str) -> None:
    model = _seeded(CNN_SPEC)
    before = copy.deepcopy(model.state_dict())
    pruner = MagnitudePruner(scope=scope, ignored_layers=["features.0"])
    masks = pruner.compute_masks(model, 0.9)
    apply_masks(model, masks)
    assert set(masks) == {"features.4.weight", "classifier.weight"}
    for name, tensor in model.state_dict().items():
        if name in masks:
            assert not torch.equal(tensor, before[name])
        else:  # biases, every BatchNorm tensor, and the ignored first conv
            assert torch.equal(tensor, before[name]), name


def test_sparsity_counts_zeros() -> None:
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 4.0, 5.0]]))  # 3 zeros of 8
        model[0].bias.copy_(torch.tensor([0.0, 1.0]))  # 1 zero of 2, not prunable
        model[2].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]))  # 1 zero of 6, ignored below
        model[2].bias.fill_(1.0)
    masks = MagnitudePruner(ignored_layers=["2"]).compute_masks(model, 0.0)
    report = sparsity(model, masks)
    assert report["per_layer"] == {"0.weight": {"numel": 8, "zeros": 3, "sparsity": 3 / 8}}
    assert report["overall"] == pytest.approx(3 / 8)
    assert report["all_parameters"] == pytest.approx((3 + 1 + 1) / (8 + 2 + 6 + 3))


def test_apply_masks_rejects_a_mask_for_another_model() -> None:
    with pytest.raises(EngineError, match="mask layers.9.weight does not match"):
        apply_masks(_seeded(MLP_SPEC), {"layers.9.weight": torch.ones(3, 3, dtype=torch.bool)})


# --- random pruning ---------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
def test_random_pruner_removes_the_same_exact_counts(ratio: float) -> None:
    model = _with_ties_and_zeros(CNN_SPEC)
    weights = prunable_weights(model)
    layerwise = RandomPruner(scope="layerwise", seed=3).compute_masks(model, ratio)
    expected = {name: round(ratio * weight.numel()) for name, weight in weights.items()}
    assert {name: int((~mask).sum()) for name, mask in layerwise.items()} == expected
    pooled = RandomPruner(scope="global", seed=3).compute_masks(model, ratio)
    assert sum(int((~m).sum()) for m in pooled.values()) == round(ratio * sum(w.numel() for w in weights.values()))


def test_random_pruner_depends_on_the_seed_only() -> None:
    first, other = _seeded(CNN_SPEC, seed=0), _seeded(CNN_SPEC, seed=1)  # different weights, same layout
    masks = RandomPruner(seed=7).compute_masks(first, 0.5)
    again = RandomPruner(seed=7).compute_masks(other, 0.5)
    reseeded = RandomPruner(seed=8).compute_masks(first, 0.5)
    assert all(torch.equal(masks[name], again[name]) for name in masks)
    assert not all(torch.equal(masks[name], reseeded[name]) for name in masks)
    magnitude = MagnitudePruner().compute_masks(first, 0.5)
    assert not all(torch.equal(masks[name], magnitude[name]) for name in masks)


# --- per-layer ratios -------------------------------------------------------------------------


@pytest.mark.parametrize("pruner_type", [MagnitudePruner, RandomPruner])
@pytest.mark.parametrize("ratio", [0.0, 0.33, 0.8])
def test_layerwise_with_layer_ratios_is_exact_in_every_layer(pruner_type, ratio: float) -> None:
    model = _with_ties_and_zeros(CNN_SPEC)
    overrides = {"features.0": 0.25, "classifier": 0.0}
    masks = pruner_type(scope="layerwise", layer_ratios=overrides).compute_masks(model, ratio)
    for name, weight in prunable_weights(model).items():
        layer_ratio = overrides.get(name.removesuffix(".weight"), ratio)
        assert int((~masks[name]).sum()) == round(layer_ratio * weight.numel()), name


@pytest.mark.parametrize("pruner_type", [MagnitudePruner, RandomPruner])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.77])
def test_global_with_layer_ratios_keeps_the_overall_ratio(pruner_type, ratio: float) -> None:
    model = _with_ties_and_zeros(CNN_SPEC)
    weights = prunable_weights(model)
    masks = pruner_type(scope="global", layer_ratios={"classifier": 0.1}).compute_masks(model, ratio)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(ratio * total)
    assert int((~masks["classifier.weight"]).sum()) == round(0.1 * weights["classifier.weight"].numel())
    if pruner_type is MagnitudePruner:  # the other layers share one threshold
        pooled = ["features.0.weight", "features.4.weight"]
        kept = torch.cat([weights[n].detach().abs()[masks[n]] for n in pooled])
        removed = torch.cat([weights[n].detach().abs()[~masks[n]] for n in pooled])
        assert kept.min() >= removed.max()


def test_global_layer_ratios_the_other_layers_cannot_meet_are_an_error() -> None:
    model = _seeded(CNN_SPEC)  # features.4 holds 216 of the 270 prunable weights
    with pytest.raises(EngineError, match="leaving .* for the other layers"):
        MagnitudePruner(scope="global", layer_ratios={"features.4": 0.0}).compute_masks(model, 0.9)
    with pytest.raises(EngineError, match="leaving -"):
        MagnitudePruner(scope="global", layer_ratios={"features.4": 0.9}).compute_masks(model, 0.1)


def test_layer_ratios_name_prunable_layers_that_are_not_kept_dense() -> None:
    with pytest.raises(EngineError, match="layers given a pruning ratio classifer are not prunable"):
        MagnitudePruner(layer_ratios={"classifer": 0.5}).compute_masks(_seeded(CNN_SPEC), 0.5)
    with pytest.raises(EngineError, match="both kept dense and given a pruning ratio"):
        MagnitudePruner(ignored_layers=["classifier"], layer_ratios={"classifier": 0.5})
    with pytest.raises(EngineError, match=r"pruning ratio of layer classifier must be in \[0, 1\)"):
        RandomPruner(layer_ratios={"classifier": 1.0})


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_previous_masks_nest(scope: str) -> None:
    model = _seeded(CNN_SPEC)
    pruner = MagnitudePruner(scope=scope)
    masks = None
    for ratio in (0.2, 0.5, 0.7, 0.9):
        new = pruner.compute_masks(model, ratio, previous=masks)
        if masks is not None:
            assert all(bool((new[n] <= masks[n]).all()) for n in new)  # kept now ⇒ kept before
        with torch.no_grad():  # move the surviving weights, as fine-tuning would
            for weight in prunable_weights(model).values():
                weight.mul_(torch.empty_like(weight).uniform_(0.0, 2.0))
        apply_masks(model, new)
        masks = new


# --- layers kept dense ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (CNN_SPEC, ["features.0", "classifier"]),
        ({"name": "resnet20"}, ["conv1", "fc"]),
        ({"name": "mobilenet_v2", "num_classes": 10, "image_size": 32}, ["features.0.0", "classifier.1"]),
        (MLP_SPEC, ["layers.0", "layers.4"]),
        ({"name": "mlp", "in_features": 9, "hidden": [], "num_classes": 3}, ["layers.0"]),
    ],
    ids=["cnn", "resnet20", "mobilenet_v2", "mlp", "mlp-no-hidden"],
)
def test_default_dense_layers_are_the_first_conv_and_the_last_linear(spec: dict, expected: list[str]) -> None:
    assert default_dense_layers(build_model(spec)) == expected


@pytest.mark.parametrize(("pruner_type", "scope"), [(MagnitudePruner, "global"), (RandomPruner, "layerwise")])
def test_default_dense_layers_stay_bitwise_untouched(pruner_type, scope: str) -> None:
    model = build_model({"name": "resnet20"})
    before = copy.deepcopy(model.state_dict())
    masks = pruner_type(scope=scope, ignored_layers=default_dense_layers(model)).compute_masks(model, 0.9)
    apply_masks(model, masks)
    assert "conv1.weight" not in masks and "fc.weight" not in masks
    for name in ("conv1.weight", "fc.weight", "fc.bias"):
        assert torch.equal(model.state_dict()[name], before[name])
    # Within one weight per layer (layerwise rounds each layer) or overall (global).
    total = sum(m.numel() for m in masks.values())
    assert sparsity(model, masks)["overall"] == pytest.approx(0.9, abs=len(masks) / total)


# --- masks kept through training --------------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    ],
    ids=["sgd-momentum-wd", "adam"],
)
def test_mask_keeper_reapplies_masks_after_every_step(make_optimizer) -> None:
    model = _seeded(MLP_SPEC)
    masks = MagnitudePruner(scope="layerwise").compute_masks(model, 0.6)
    keeper = MaskKeeper(model, masks)  # applies at once
    optimizer = make_optimizer(model.parameters())
    handle = keeper.attach(optimizer)
    x, y = torch.randn(16, 9), torch.randint(0, 3, (16,))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        for name, weight in prunable_weights(model).items():
            assert not bool(weight[~masks[name]].any()), name
    assert all(torch.equal(keeper.masks[name], masks[name]) for name in masks)
    handle.remove()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # detached: momentum revives the removed weights
    assert any(bool(w[~masks[n]].any()) for n, w in prunable_weights(model).items())


def test_mask_keeper_rejects_masks_of_another_model() -> None:
    with pytest.raises(EngineError, match="mask layers.9.weight does not match"):
        MaskKeeper(_seeded(MLP_SPEC), {"layers.9.weight": torch.ones(3, 3, dtype=torch.bool)})
