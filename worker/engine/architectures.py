"""Torch modules for the architectures in `service.architectures`, and safe weight loading.

The JSON-spec networks (mlp, cnn) are here; the named torchvision-compatible ones (resnet18, …,
resnet56) are in `worker.engine.zoo`; a "pruned" spec is rebuilt by `worker.engine.structured`.

Weights are read only as safetensors (tensors, never pickled code) and checked key by key against
the module before anything is copied in.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from os import PathLike
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from service.architectures import (
    CNNSpec,
    MLPSpec,
    PrunedSpec,
    architecture_adapter,
    state_dict_mismatch,
)
from worker.engine import zoo
from worker.engine.errors import EngineError


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


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised module for `spec` (the dict of `spec.model_dump()`), in eval mode."""
    try:
        validated = architecture_adapter.validate_python(spec)
    except ValidationError as error:
        raise EngineError(f"architecture spec is invalid: {_describe_validation_error(error)}") from error
    model: nn.Module
    if isinstance(validated, PrunedSpec):
        # The base's module with its layers shrunk to the recorded widths (checked again there, and
        # run once); imported here because structured.py builds its base models with this function.
        from worker.engine.structured import rebuild_structured

        base = validated.base.model_dump(mode="json")
        model = rebuild_structured(base, {"version": validated.version, "base": base, "layers": validated.layers})
        model.spec = validated  # input_shape, error messages and re-pruning see the pruned spec
    elif isinstance(validated, MLPSpec):
        model = MLP(validated)
    elif isinstance(validated, CNNSpec):
        model = CNN(validated)
    else:
        model = zoo.BUILDERS[validated.name](num_classes=validated.num_classes)
        # Not part of the state_dict: only names the architecture in error messages.
        model.spec = validated
    return model.eval()


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
    """The kinds of `service.architectures.expected_state_dict` ("float", "int"); others by name."""
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
