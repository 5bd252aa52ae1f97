"""Channel pruning with Torch-Pruning on registry architectures: the pruned models run and are smaller,
removing a channel equals zeroing its outgoing weights in the dense model, and a recorded pruned
architecture rebuilds a module that loads the pruned weights strictly and computes the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from arch.registry import PrunedSpec, architecture_adapter, expected_state_dict, input_shape, parameter_count
from worker.engine.architectures import build_model, load_weights
from worker.engine.errors import EngineError
from worker.engine.structured import (
    ChannelPruner,
    compare_models,
    measure_latency,
    model_cost,
    rebuild_structured,
)

MLP_SPEC = {"name": "mlp", "in_features": 12, "hidden": [10, 8], "num_classes": 3}
CNN_SPEC = {"name": "cnn", "in_channels": 3, "image_size": 8, "channels": [6, 8], "num_classes": 4}
RESNET20 = {"name": "resnet20"}
MOBILENET = {"name": "mobilenet_v2", "num_classes": 10, "image_size": 32}


def _model(spec: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():  # non-trivial BN statistics and biases, so equalities below are real checks
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and ("running" in name or name.endswith("bias")):
                tensor.uniform_(0.5, 1.5) if "var" in name else tensor.uniform_(-0.5, 0.5)
    return model


def _inputs(spec: dict, n: int = 4) -> torch.Tensor:
    return torch.randn(n, *input_shape(build_model(spec).spec), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pruned_zoo() -> dict[str, tuple[nn.Module, object]]:
    """cnn, resnet20 and mobilenet_v2 (32×32) channel-pruned by half with L1, built once."""
    pruned = {}
    for spec in (CNN_SPEC, RESNET20, MOBILENET):
        dense = _model(spec)
        pruned[spec["name"]] = (dense, spec, ChannelPruner("l1", "layerwise").prune(dense, 0.5))
    return pruned


@pytest.mark.parametrize("name", ["cnn", "resnet20", "mobilenet_v2"])
def test_pruned_models_run_and_are_smaller(pruned_zoo, name: str) -> None:
    dense, spec, result = pruned_zoo[name]
    shape = input_shape(dense.spec)
    logits = result.model(_inputs(spec))
    assert logits.shape == (4, dense(_inputs(spec)).shape[1]) and bool(logits.isfinite().all())
    dense_cost, pruned_cost = model_cost(dense, shape), model_cost(result.model, shape)
    assert pruned_cost["parameters"] < 0.6 * dense_cost["parameters"]
    assert pruned_cost["macs"] < 0.6 * dense_cost["macs"]
    assert pruned_cost["file_bytes"] < dense_cost["file_bytes"]
    assert result.removed_channels and not result.model.training


def test_the_dense_model_is_left_as_it_was() -> None:
    dense = _model(CNN_SPEC)
    before = copy.deepcopy(dense.state_dict())
    ChannelPruner().prune(dense, 0.5)
    assert all(torch.equal(tensor, before[key]) for key, tensor in dense.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in dense.modules())


def test_residual_channels_stay_coupled(pruned_zoo) -> None:
    _, _, result = pruned_zoo["resnet20"]
    layers = result.architecture["layers"]
    # Every block of a stage adds into the same shortcut: its conv2 outputs equal the stage's width.
    for stage, blocks in (("layer1", 3), ("layer2", 3), ("layer3", 3)):
        widths = {layers[f"{stage}.{b}.conv2"]["out_channels"] for b in range(blocks)}
        assert len(widths) == 1
    assert layers["fc"]["out_features"] == 10  # the classifier keeps its classes


def _zero_outgoing(dense: nn.Module, removed: dict[str, list[int]], consumers: dict[str, str]) -> nn.Module:
    """The masked equivalent: the dense model with the input slices that read each removed channel zeroed."""
    masked = copy.deepcopy(dense)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for producer, channels in removed.items():
            modules[consumers[producer]].weight[:, channels] = 0.0
    return masked


@pytest.mark.parametrize(
    ("spec", "consumers"),
    [
        (MLP_SPEC, {"layers.0": "layers.2", "layers.2": "layers.4"}),
        (CNN_SPEC, {"features.0": "features.4", "features.4": "classifier"}),
    ],
    ids=["mlp-hidden-units", "cnn-conv-channels"],
)
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_removing_channels_equals_zeroing_their_outgoing_weights(spec: dict, consumers: dict, norm: str) -> None:
    dense = _model(spec)
    result = ChannelPruner(norm, "layerwise").prune(dense, 0.5)
    assert set(result.removed_channels) == set(consumers)
    masked = _zero_outgoing(dense, result.removed_channels, consumers)
    x = _inputs(spec, n=16)
    torch.testing.assert_close(result.model(x), masked(x), atol=1e-5, rtol=0)
    assert not torch.allclose(dense(x), masked(x), atol=1e-3)  # the removed channels did matter


def test_l1_and_l2_rank_by_their_own_norm() -> None:
    dense = _model(MLP_SPEC)
    with torch.no_grad():
        w = dense.layers[0].weight  # 10 hidden units × 12 inputs; every row L1 12, L2 √12 ≈ 3.46 ...
        w.fill_(1.0)
        w[0] = 0.0
        w[0, 0] = 2.0  # ... unit 0: L1 2, L2 2
        w[1] = 0.4  # ... unit 1: L1 4.8, L2 ≈ 1.39
        dense.layers[2].weight.fill_(0.1)  # the same outgoing weights for every unit
    assert ChannelPruner("l1").prune(dense, 0.1).removed_channels["layers.0"] == [0]
    assert ChannelPruner("l2").prune(dense, 0.1).removed_channels["layers.0"] == [1]


def test_scope_layer_ratios_and_ignored_layers() -> None:
    dense = _model(MLP_SPEC)
    kept = ChannelPruner(ignored_layers=["layers.0"]).prune(dense, 0.5).architecture["layers"]
    assert kept["layers.0"]["out_features"] == 10 and kept["layers.2"]["out_features"] == 4
    custom = ChannelPruner(layer_ratios={"layers.0": 0.8}).prune(dense, 0.25).architecture["layers"]
    assert custom["layers.0"]["out_features"] == 2 and custom["layers.2"]["out_features"] == 6
    pooled = ChannelPruner(scope="global").prune(dense, 0.5).architecture["layers"]
    assert pooled["layers.0"]["out_features"] + pooled["layers.2"]["out_features"] == 9
    assert pooled["layers.4"]["out_features"] == 3
    with pytest.raises(EngineError, match="ignored layers layers.9 are not prunable layers"):
        ChannelPruner(ignored_layers=["layers.9"]).prune(dense, 0.5)
    with pytest.raises(EngineError, match="norm must be 'l1' or 'l2'"):
        ChannelPruner("l3")
    with pytest.raises(EngineError, match="needs a model built from a registry architecture"):
        ChannelPruner().prune(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 0.5)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_rebuilt_architecture_loads_strictly_and_computes_the_same(pruned_zoo, tmp_path, name: str) -> None:
    _, spec, result = pruned_zoo[name]
    architecture = json.loads(json.dumps(result.architecture))  # as stored and re-uploaded
    path = tmp_path / "pruned.safetensors"
    save_file(result.model.state_dict(), path)
    assert model_cost(result.model, input_shape(result.model.spec))["file_bytes"] == path.stat().st_size
    rebuilt = rebuild_structured(spec, architecture)
    load_weights(rebuilt, path)  # key, shape and dtype check, then load_state_dict(strict=True)
    rebuilt.load_state_dict(result.model.state_dict(), strict=True)
    x = _inputs(spec)
    assert torch.equal(rebuilt(x), result.model(x))


def test_rebuild_rejects_an_architecture_that_does_not_fit() -> None:
    dense = _model(CNN_SPEC)
    architecture = ChannelPruner().prune(dense, 0.5).architecture
    bad_layer = copy.deepcopy(architecture)
    bad_layer["layers"]["features.9"] = {"num_features": 2}
    with pytest.raises(EngineError, match="names 'features.9', which is not a Conv, Linear or BatchNorm"):
        rebuild_structured(CNN_SPEC, bad_layer)
    grown = copy.deepcopy(architecture)
    grown["layers"]["features.0"]["out_channels"] = 7
    with pytest.raises(EngineError, match="out_channels must be a whole number from 1 to 6"):
        rebuild_structured(CNN_SPEC, grown)
    mismatched = copy.deepcopy(architecture)
    mismatched["layers"]["features.1"]["num_features"] = 1  # BN no longer matches its conv
    with pytest.raises(EngineError, match="does not fit together"):
        rebuild_structured(CNN_SPEC, mismatched)
    with pytest.raises(EngineError, match="was made from"):
        rebuild_structured({**CNN_SPEC, "num_classes": 5}, architecture)


def test_latency_and_side_by_side_comparison() -> None:
    dense = _model(CNN_SPEC)
    pruned = ChannelPruner().prune(dense, 0.5).model
    shape = input_shape(dense.spec)
    assert measure_latency(dense, shape, batch_size=2, repeats=3) > 0
    report = compare_models(dense, pruned, shape, batch_sizes=(1, 8), repeats=3)
    assert report["ratios"]["parameters"] > 1 and report["ratios"]["macs"] > 1
    assert {"latency_s_batch_1", "latency_s_batch_8"} <= set(report["pruned"])
    json.dumps(report)


def _pruned(pruned_zoo, name: str):
    if name == "mlp":
        dense = _model(MLP_SPEC)
        return dense, MLP_SPEC, ChannelPruner("l1", "layerwise").prune(dense, 0.5)
    return pruned_zoo[name]


def _layout(model: nn.Module) -> dict:
    return {key: (tuple(t.shape), "float" if t.is_floating_point() else "int") for key, t in model.state_dict().items()}


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20", "mobilenet_v2"])
def test_a_recipe_architecture_uploads_as_a_pruned_spec(pruned_zoo, tmp_path, name: str) -> None:
    """The recipe's {"name": "pruned", **architecture} validates in the web process, describes the pruned
    model's state dict exactly, and builds (from the stored dump) a model its weights load into strictly."""
    dense, spec, result = _pruned(pruned_zoo, name)
    upload = json.dumps({"name": "pruned", **result.architecture})  # as the worker writes it into the recipe
    pruned_spec = architecture_adapter.validate_json(upload)
    assert isinstance(pruned_spec, PrunedSpec)
    actual, expected = _layout(result.model), expected_state_dict(pruned_spec)
    assert list(actual) == list(expected) and actual == expected  # names in order, shapes, dtype kinds
    assert parameter_count(pruned_spec) == sum(p.numel() for p in result.model.parameters())
    assert input_shape(pruned_spec) == input_shape(dense.spec)
    assert pruned_spec.num_classes == dense.spec.num_classes

    path = tmp_path / "pruned.safetensors"
    save_file(result.model.state_dict(), path)
    rebuilt = build_model(pruned_spec.model_dump())  # the stored architecture, as the worker reads it
    assert rebuilt.spec == pruned_spec
    load_weights(rebuilt, path)  # key, shape and dtype check, then load_state_dict(strict=True)
    rebuilt.load_state_dict(result.model.state_dict(), strict=True)
    x = _inputs(spec)
    assert torch.equal(rebuilt(x), result.model(x))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_pruning_a_pruned_model_again_describes_it_over_the_registry_base(pruned_zoo, name: str) -> None:
    result = _pruned(pruned_zoo, name)[2]
    rebuilt = build_model({"name": "pruned", **result.architecture})
    rebuilt.load_state_dict(result.model.state_dict(), strict=True)
    again = ChannelPruner().prune(rebuilt, 0.5)
    assert again.architecture["base"] == result.architecture["base"]  # never a nested "pruned" base
    assert (
        parameter_count(architecture_adapter.validate_python({"name": "pruned", **again.architecture}))
        == sum(p.numel() for p in again.model.parameters())
        < sum(p.numel() for p in result.model.parameters())
    )
