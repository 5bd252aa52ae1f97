"""Torch modules for the architectures in `arch`, and safe weight loading.

The JSON-spec networks (mlp, cnn) are here; the named torchvision-compatible ones (resnet18, …,
resnet56) are in `worker.engine.zoo`; a "pruned" spec is its base's module with its layers shrunk
here to the recorded widths (`worker.engine.structured` records them).

Weights are read only as safetensors (tensors, never pickled code) and checked key by key against
the module before anything is copied in.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from arch.mismatch import state_dict_mismatch
from arch.registry import AnySpec, PrunedSpec, architecture_adapter, input_shape
from arch.specs import BaseSpec, CNNSpec, MLPSpec, OnnxSpec
from worker.engine import zoo
from worker.engine.errors import EngineError
from worker.engine.onnx_model import build_from_graph

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MLP(nn.Module):
    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        self.spec = spec
        widths = [spec.in_features, *spec.hidden, spec.num_classes]
        linears = [nn.Linear(fan_in, fan_out) for fan_in, fan_out in pairwise(widths)]
        # Linear, ReLU, Linear, …, Linear: no activation after the logits.
        modules: list[nn.Module] = [linears[0]]
        for linear in linears[1:]:
            modules += [nn.ReLU(), linear]
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


class CNN(nn.Module):
    def __init__(self, spec: CNNSpec) -> None:
        super().__init__()
        self.spec = spec
        blocks: list[nn.Module] = []
        size = spec.image_size
        for c_in, c_out in pairwise([spec.in_channels, *spec.channels]):
            # Stop halving once the map is 1×1, so any depth fits any image_size.
            pool = nn.MaxPool2d(2) if size >= 2 else nn.Identity()
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), pool]
            size = size // 2 if size >= 2 else size
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(spec.channels[-1], spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def attach_spec(model: nn.Module, spec: AnySpec) -> None:
    """Keep the module's validated spec on it as a plain attribute `spec` (not part of the state_dict), as MLP and
    CNN do themselves; model_spec reads it. nn.Module's typed __setattr__ admits only tensors and modules, though
    any other value is stored as an ordinary instance attribute, which is what this writes."""
    model.__dict__["spec"] = spec


def model_spec(model: nn.Module) -> AnySpec:
    """The spec of a module from build_model (see attach_spec)."""
    spec: AnySpec = model.__dict__["spec"]
    return spec


def build_model(spec: Mapping[str, Any], graph_path: Path | None = None) -> nn.Module:
    """A freshly initialised module for `spec` (the dict of `spec.model_dump()`), in eval mode. An imported ONNX
    model is built from its stored graph at `graph_path`, with the graph's weights."""
    try:
        validated = architecture_adapter.validate_python(spec)
    except ValidationError as error:
        raise EngineError(f"architecture spec is invalid: {_describe_validation_error(error)}") from error
    if isinstance(validated, OnnxSpec):
        if graph_path is None:
            raise EngineError("an imported ONNX model is built from its stored graph, and none was given")
        imported = build_from_graph(validated, graph_path)
        attach_spec(imported, validated)
        return imported.eval()
    if isinstance(validated, PrunedSpec):
        model = _build_base(validated.base)
        shrink_layers(model, validated.layers, validated.base.name)
        attach_spec(model, validated)  # input_shape, error messages and re-pruning see the pruned spec
        return model
    return _build_base(validated).eval()


def _build_base(spec: BaseSpec) -> nn.Module:
    if isinstance(spec, MLPSpec):
        return MLP(spec)
    if isinstance(spec, CNNSpec):
        return CNN(spec)
    model = zoo.build_named(spec.name, spec.num_classes, spec.in_channels)
    attach_spec(model, spec)  # names the architecture in error messages
    return model


def layer_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Every Conv, Linear and BatchNorm of `model` by module name, with its widths under the names
    of `arch`'s pruned specs."""
    widths: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _CONVS):
            widths[name] = {
                "in_channels": module.in_channels,
                "out_channels": module.out_channels,
                "groups": module.groups,
            }
        elif isinstance(module, nn.Linear):
            widths[name] = {"in_features": module.in_features, "out_features": module.out_features}
        elif isinstance(module, _BATCH_NORMS):
            widths[name] = {"num_features": module.num_features}
    return widths


def shrink_layers(model: nn.Module, layers: Mapping[Any, Any], architecture: str) -> None:
    """Shrink the named layers of freshly built `model` (of `architecture`) in place to the given
    widths, with placeholder values (weights are loaded next), and run it once in eval mode, where it
    is left. The widths are checked as untrusted input: known layers, the right kind, widths that only
    shrink, and a model that runs."""
    modules = dict(model.named_modules())
    for name, widths in layers.items():
        module = modules.get(name) if isinstance(name, str) else None
        if module is None or not isinstance(module, (*_CONVS, nn.Linear, *_BATCH_NORMS)):
            raise EngineError(
                f"the pruned architecture names {name!r}, which is not a Conv, Linear or BatchNorm "
                f"layer of {architecture}"
            )
        _resize(name, module, widths)
    model.eval()  # a forward in training mode would move the BatchNorm statistics
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape(model_spec(model))))
    except RuntimeError as error:
        raise EngineError(f"the pruned architecture does not fit together: {error}") from error


def _resize(name: str, module: nn.Module, widths: Any) -> None:
    """Shrink one freshly built layer to `widths`, with placeholder values (weights are loaded next)."""
    current = layer_widths(module)[""]
    if not isinstance(widths, Mapping) or set(widths) != set(current):
        raise EngineError(f"layer {name} of the pruned architecture must give exactly {', '.join(sorted(current))}")
    for field, value in widths.items():
        if type(value) is not int or not 1 <= value <= current[field]:
            raise EngineError(f"layer {name}: {field} must be a whole number from 1 to {current[field]}, got {value!r}")
    if isinstance(module, _CONVS):
        groups, c_in, c_out = widths["groups"], widths["in_channels"], widths["out_channels"]
        depthwise = current["groups"] > 1 and current["groups"] == current["in_channels"]
        if (groups == 1) == depthwise or c_in % groups or c_out % groups or (depthwise and not groups == c_in == c_out):
            raise EngineError(
                f"layer {name}: groups {groups} do not fit {c_in} input and {c_out} output channels "
                f"of a {'depthwise' if depthwise else 'dense'} convolution"
            )
        module.in_channels, module.out_channels, module.groups = c_in, c_out, groups
        module.weight = nn.Parameter(module.weight.new_zeros(c_out, c_in // groups, *module.weight.shape[2:]))
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.new_zeros(c_out))
    elif isinstance(module, nn.Linear):
        c_in, c_out = widths["in_features"], widths["out_features"]
        module.in_features, module.out_features = c_in, c_out
        module.weight = nn.Parameter(module.weight.new_zeros(c_out, c_in))
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.new_zeros(c_out))
    else:
        assert isinstance(module, _BATCH_NORMS), "shrink_layers resizes only Conv, Linear and BatchNorm layers"
        n = widths["num_features"]
        module.num_features = n
        # A BatchNorm has weight and bias both (affine) or neither, running mean and variance both or neither.
        if module.weight is not None and module.bias is not None:
            module.weight = nn.Parameter(module.weight.new_ones(n))
            module.bias = nn.Parameter(module.bias.new_zeros(n))
        if module.running_mean is not None and module.running_var is not None:
            module.running_mean = module.running_mean.new_zeros(n)
            module.running_var = module.running_var.new_ones(n)


def load_weights(model: nn.Module, path: str | PathLike[str]) -> None:
    """Fill `model` in place from a safetensors file after a strict key/shape/dtype-kind check;
    leaves it in eval mode."""
    try:
        tensors = load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise EngineError(f"the weights file is not a readable safetensors file: {error}") from error
    spec = getattr(model, "spec", None)
    architecture = spec.name if spec is not None else type(model).__name__
    mismatch = state_dict_mismatch(architecture, _layout(model.state_dict()), _layout(tensors))
    if mismatch is not None:
        raise EngineError(mismatch.message)
    non_finite = [name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
    if non_finite:
        raise EngineError(f"the weights contain NaN or infinite values in {', '.join(non_finite[:5])}")
    model.load_state_dict(tensors, strict=True)
    model.eval()


def _dtype_kind(tensor: torch.Tensor) -> str:
    """The kinds of `arch.expected_state_dict` ("float", "int"); others by name."""
    if tensor.is_floating_point():
        return "float"
    if tensor.is_complex() or tensor.dtype == torch.bool:
        return str(tensor.dtype).removeprefix("torch.")
    return "int"


def _layout(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (tuple(tensor.shape), _dtype_kind(tensor)) for name, tensor in tensors.items()}


def _describe_validation_error(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in detail['loc']) or 'spec'}: {detail['msg']}" for detail in error.errors()
    )
