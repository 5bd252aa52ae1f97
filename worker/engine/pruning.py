"""Unstructured magnitude pruning, in the style of Torch-Pruning: a pruner computes masks, a separate
step applies them, and measuring sparsity is a third. Only the weights of Linear and Conv layers are
pruned; biases and normalisation layers never are (as in Balancing Act and FairGRAPE)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from worker.engine.errors import EngineError

PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Scope = Literal["global", "layerwise"]


def prunable_weights(model: nn.Module, ignored_layers: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """The `weight` of every Linear/Conv module not named in `ignored_layers`, keyed by parameter
    name (e.g. "layers.0.weight"), in module order."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, PRUNABLE_MODULES)}
    unknown = sorted(set(ignored_layers) - layers.keys())
    if unknown:
        # A misspelt layer would silently be pruned while the user believes it is kept dense.
        raise EngineError(
            f"ignored layers {', '.join(unknown)} are not prunable layers of this model; "
            f"its prunable layers are {', '.join(layers) or 'none'}"
        )
    return {_weight_name(name): module.weight for name, module in layers.items() if name not in ignored_layers}


def _weight_name(module_name: str) -> str:
    # The root module has the empty name; its weight is just "weight" in named_parameters().
    return f"{module_name}.weight" if module_name else "weight"


class MagnitudePruner:
    """Removes the smallest-|w| weights: over all prunable weights pooled ("global", one threshold,
    so per-layer sparsity varies) or the same fraction from each layer ("layerwise")."""

    def __init__(self, scope: Scope = "global", ignored_layers: Sequence[str] = ()) -> None:
        if scope not in ("global", "layerwise"):
            raise EngineError(f"pruning scope must be 'global' or 'layerwise', not {scope!r}")
        self.scope = scope
        self.ignored_layers = tuple(ignored_layers)

    def compute_masks(self, model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
        """Bool masks (True = kept) keyed by parameter name. Removes exactly round(ratio · count)
        weights, per layer or in total; ties in |w| go to the lower flat index, so already-zero or
        equal weights still give exact, reproducible counts."""
        if not 0.0 <= ratio < 1.0:
            raise EngineError(f"pruning ratio must be in [0, 1), got {ratio}")
        weights = prunable_weights(model, self.ignored_layers)
        if self.scope == "layerwise":
            return {name: _layer_mask(w.detach(), ratio) for name, w in weights.items()}
        return _global_masks(weights, ratio)


def _layer_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    return _keep_mask(weight.abs().flatten(), round(ratio * weight.numel())).view_as(weight)


def _global_masks(weights: Mapping[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    if not weights:
        return {}
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _keep_mask(magnitudes, round(ratio * magnitudes.numel()))
    pieces = keep.split([w.numel() for w in weights.values()])
    return {name: piece.view_as(w) for (name, w), piece in zip(weights.items(), pieces, strict=True)}


def _keep_mask(magnitudes: torch.Tensor, n_removed: int) -> torch.Tensor:
    """False at the `n_removed` smallest entries of a flat tensor: a stable sort orders ties by
    index, so the count is exact whatever the values."""
    order = torch.argsort(magnitudes, stable=True)
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    keep[order[:n_removed]] = False
    return keep


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the removed weights in place."""
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in parameters or parameters[name].shape != mask.shape:
            raise EngineError(f"mask {name} does not match a parameter of the same shape in this model")
        parameters[name].mul_(mask.to(parameters[name].device))


@torch.no_grad()
def sparsity(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict:
    """Fractions of exact zeros: `overall` over the prunable weights (the masks' keys),
    `all_parameters` over every parameter (biases, norm layers, ignored layers too), and per layer."""
    parameters = dict(model.named_parameters())
    per_layer = {name: _zero_count(parameters[name]) for name in masks}
    prunable_numel = sum(layer["numel"] for layer in per_layer.values())
    prunable_zeros = sum(layer["zeros"] for layer in per_layer.values())
    all_numel = sum(p.numel() for p in parameters.values())
    all_zeros = sum(int((p == 0).sum()) for p in parameters.values())
    return {
        "overall": prunable_zeros / prunable_numel if prunable_numel else 0.0,
        "all_parameters": all_zeros / all_numel if all_numel else 0.0,
        "per_layer": per_layer,
    }


def _zero_count(weight: torch.Tensor) -> dict:
    numel, zeros = weight.numel(), int((weight == 0).sum())
    return {"numel": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0}
