"""Unstructured pruning, in the style of Torch-Pruning: a pruner computes masks, a separate step
applies them, and measuring sparsity is a third. Only the weights of Linear and Conv layers are
pruned; biases and normalisation layers never are (as in Balancing Act and FairGRAPE; docs/METHODS.md §14).

A pruner is an importance (|w| for `MagnitudePruner`, seeded uniform noise for `RandomPruner`), a
scope, the layers kept dense and optional per-layer ratios. Both remove exact counts: the
`round(ratio · count)` lowest-importance weights, ties to the lower flat index (a stable sort), so
already-zero or equal weights still give exact, reproducible counts.

Per-layer ratios (`layer_ratios`, module name → ratio) override the scope's ratio for those layers,
each of which loses exactly `round(r · numel)` weights. With the "layerwise" scope every other layer
loses `round(ratio · numel)`. With the "global" scope `ratio` keeps its meaning as the sparsity over
*all* prunable weights: the overall budget is `round(ratio · total)` weights, the overridden layers
take their exact shares of it, and the remaining layers share one threshold for what is left. A
budget the remaining layers cannot meet (the overrides already remove more than the budget, or
the rest would have to lose more weights than they have) is an error, not a silent change of ratio.

Masks are kept through training by `MaskKeeper`, which re-zeroes the removed weights after every
optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from worker.engine.errors import EngineError

PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PrunableModule = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

Scope = Literal["global", "layerwise"]
Masks = dict[str, torch.Tensor]


def prunable_layers(model: nn.Module) -> dict[str, PrunableModule]:
    """Every Linear/Conv module by module name, in module (registration) order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PRUNABLE_MODULES)}


def prunable_weights(model: nn.Module, ignored_layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The `weight` (an nn.Parameter) of every Linear/Conv module not named in `ignored_layers`, keyed by
    parameter name (e.g. "layers.0.weight"), in module order."""
    layers = prunable_layers(model)
    check_layer_names(layers, ignored_layers, "ignored layers")
    return {_weight_name(name): module.weight for name, module in layers.items() if name not in ignored_layers}


def default_dense_layers(model: nn.Module) -> list[str]:
    """The layers Balancing Act keeps dense: the first conv (the first Linear when the model has no
    conv, as an MLP) and the last Linear, in module order. One name when they are the same layer
    (an MLP without hidden layers), none for a model without prunable layers."""
    layers = prunable_layers(model)
    convs = [name for name, module in layers.items() if isinstance(module, CONV_MODULES)]
    linears = [name for name, module in layers.items() if isinstance(module, nn.Linear)]
    first = convs[:1] or linears[:1]
    last = linears[-1:]
    return list(dict.fromkeys(first + last))


def check_layer_names(layers: Mapping[str, nn.Module], names: Sequence[str], what: str) -> None:
    unknown = sorted(set(names) - layers.keys())
    if unknown:
        # A misspelt layer would silently be pruned while the user believes it is kept dense.
        raise EngineError(
            f"{what} {', '.join(unknown)} are not prunable layers of this model; "
            f"its prunable layers are {', '.join(layers) or 'none'}"
        )


def _weight_name(module_name: str) -> str:
    # The root module has the empty name; its weight is just "weight" in named_parameters().
    return f"{module_name}.weight" if module_name else "weight"


def check_ratio(ratio: float, what: str = "pruning ratio") -> None:
    if not 0.0 <= ratio < 1.0:
        raise EngineError(f"{what} must be in [0, 1), got {ratio}")


class _UnstructuredPruner:
    """Exact-count masks from an importance score per weight; subclasses say what the score is."""

    def __init__(
        self,
        scope: Scope = "global",
        ignored_layers: Sequence[str] = (),
        layer_ratios: Mapping[str, float] | None = None,
    ) -> None:
        if scope not in ("global", "layerwise"):
            raise EngineError(f"pruning scope must be 'global' or 'layerwise', not {scope!r}")
        self.scope = scope
        self.ignored_layers = tuple(ignored_layers)
        self.layer_ratios = dict(layer_ratios or {})
        for name, ratio in self.layer_ratios.items():
            check_ratio(ratio, f"pruning ratio of layer {name}")
        both = sorted(set(self.layer_ratios) & set(self.ignored_layers))
        if both:
            raise EngineError(f"layers {', '.join(both)} are both kept dense and given a pruning ratio")

    def importance(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One score per weight, same shapes; the lowest scores are removed first."""
        raise NotImplementedError

    def compute_masks(
        self, model: nn.Module, ratio: float, previous: Mapping[str, torch.Tensor] | None = None
    ) -> Masks:
        """Bool masks (True = kept) keyed by parameter name, removing exact counts (module docstring).
        Weights already removed in `previous` rank below every other weight, so masks nest whenever
        the new count is at least the old one (gradual pruning)."""
        check_ratio(ratio)
        weights = prunable_weights(model, self.ignored_layers)
        check_layer_names(prunable_layers(model), list(self.layer_ratios), "layers given a pruning ratio")
        scores = self.importance({name: w.detach() for name, w in weights.items()})
        if previous is not None:
            scores = {name: _demote_removed(score, previous.get(name)) for name, score in scores.items()}
        counts = {name: w.numel() for name, w in weights.items()}
        overrides = {_weight_name(name): r for name, r in self.layer_ratios.items()}
        if self.scope == "layerwise":
            removed = {name: round(overrides.get(name, ratio) * numel) for name, numel in counts.items()}
            return {name: _keep_mask(score.flatten(), removed[name]).view_as(score) for name, score in scores.items()}
        return _global_masks(scores, counts, ratio, overrides)


class MagnitudePruner(_UnstructuredPruner):
    """Removes the smallest-|w| weights: over all prunable weights pooled ("global", one threshold,
    so per-layer sparsity varies) or the same fraction from each layer ("layerwise")."""

    def importance(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: w.abs() for name, w in weights.items()}


class RandomPruner(_UnstructuredPruner):
    """The baseline: removes uniformly random weights, in the same exact counts and scopes as
    `MagnitudePruner` ("global" removes a random `round(ratio · total)` of the pooled weights).
    The same seed and model layout give the same masks, whatever the weights' values."""

    def __init__(
        self,
        scope: Scope = "global",
        ignored_layers: Sequence[str] = (),
        layer_ratios: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(scope, ignored_layers, layer_ratios)
        self.seed = seed

    def importance(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        # Drawn on the CPU in module order, so the masks do not depend on the device.
        return {name: torch.rand(w.shape, generator=generator).to(w.device) for name, w in weights.items()}


def _demote_removed(score: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    if previous is None:
        return score
    # Scores are ≥ 0 (|w| or uniform noise), so −1 ranks every removed weight first.
    return torch.where(previous.to(score.device), score, torch.full_like(score, -1.0))


def _global_masks(
    scores: Mapping[str, torch.Tensor], counts: Mapping[str, int], ratio: float, overrides: Mapping[str, float]
) -> Masks:
    if not scores:
        return {}
    budget = round(ratio * sum(counts.values()))
    fixed = {name: round(overrides[name] * counts[name]) for name in scores if name in overrides}
    pooled = [name for name in scores if name not in overrides]
    left = budget - sum(fixed.values())
    pooled_numel = sum(counts[name] for name in pooled)
    if left < 0 or left > pooled_numel:
        raise EngineError(
            f"global pruning at ratio {ratio} removes {budget} weights in all, but the layers with their own "
            f"ratios remove {sum(fixed.values())}, leaving {left} for the other layers, which have "
            f"{pooled_numel}; lower or raise those layer ratios, or use the layerwise scope"
        )
    masks = {name: _keep_mask(scores[name].flatten(), n).view_as(scores[name]) for name, n in fixed.items()}
    if pooled:
        keep = _keep_mask(torch.cat([scores[name].flatten() for name in pooled]), left)
        pieces = keep.split([counts[name] for name in pooled])
        masks |= {name: piece.view_as(scores[name]) for name, piece in zip(pooled, pieces, strict=True)}
    return {name: masks[name] for name in scores}  # module order


def _keep_mask(scores: torch.Tensor, n_removed: int) -> torch.Tensor:
    """False at the `n_removed` lowest entries of a flat tensor: a stable sort orders ties by
    index, so the count is exact whatever the values."""
    order = torch.argsort(scores, stable=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
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


class MaskKeeper:
    """Keeps removed weights at zero while a model trains: `apply()` zeroes them, and `attach(optimizer)`
    calls `apply()` after every `optimizer.step()` (momentum, weight decay and Adam's update would
    otherwise revive them). `update(masks)` swaps in new masks (gradual pruning) and applies them."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self._keep: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.update(masks)

    @property
    def masks(self) -> Masks:
        parameters = {id(p): name for name, p in self.model.named_parameters()}
        return {parameters[id(p)]: keep.bool() for p, keep in self._keep}

    def update(self, masks: Mapping[str, torch.Tensor]) -> None:
        parameters = dict(self.model.named_parameters())
        keep = []
        for name, mask in masks.items():
            if name not in parameters or parameters[name].shape != mask.shape:
                raise EngineError(f"mask {name} does not match a parameter of the same shape in this model")
            parameter = parameters[name]
            # Stored as 0/1 in the parameter's dtype and device: apply() is one in-place multiply per
            # layer, several times faster than masked_fill_ with a bool mask.
            keep.append((parameter, mask.to(device=parameter.device, dtype=parameter.dtype)))
        self._keep = keep
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for parameter, keep in self._keep:
            parameter.mul_(keep)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Re-apply the masks after each `optimizer.step()`; `.remove()` the returned handle to stop."""

        def reapply(_optimizer: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
            self.apply()

        return optimizer.register_step_post_hook(reapply)


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
