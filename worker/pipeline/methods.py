"""Pruning methods by name, each an object with one job: turn the dense model into a pruned one at a ratio
(masks for unstructured methods, a physically smaller model for channel pruning), fine-tuned when the method
asks. `METHODS[spec.method]` picks one; no string tests elsewhere."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from service.schemas.audits import FineTuningSpec, MethodSpec
from worker.engine.finetune import finetune, gradual_magnitude_prune
from worker.engine.pruning import MagnitudePruner, Masks, RandomPruner, apply_masks, default_dense_layers, sparsity
from worker.engine.structured import ChannelPruner
from worker.pipeline.data import Split

EpochCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class PrunedModel:
    """A pruned (maybe fine-tuned) working model and what was done to get it."""

    model: torch.nn.Module
    masks: Masks | None  # None for physically pruned (channel) models: δ = θs − θd is not defined for them
    recipe: dict  # method, ratio, dense layers, seed, architecture: how to redo it
    layer_report: dict  # overall / per-layer sparsity (removed channels for channel pruning)


@dataclass(frozen=True)
class PruningJob:
    """What a method needs besides its spec and ratio."""

    architecture: dict
    seed: int
    train: Split | None
    device: torch.device
    on_epoch: EpochCallback

    @property
    def train_split(self) -> Split:
        """The train split, for a method that fine-tunes: audit validation requires train_dataset_id whenever
        a method fine-tunes (or is gradual), so the split is there."""
        assert self.train is not None, "a fine-tuning method needs the train split"
        return self.train


def _training(fine_tuning: FineTuningSpec) -> dict:
    return fine_tuning.model_dump(include={"lr", "batch_size", "optimizer", "momentum", "weight_decay"})


def _recipe(method: MethodSpec, ratio: float, ignored: list[str], job: PruningJob) -> dict:
    return {
        "method": {**method.model_dump(mode="json"), "label": method.label},
        "ratio": ratio,
        "ignored_layers": ignored,
        "seed": job.seed,
        "architecture": job.architecture,
    }


def _ignored_layers(method: MethodSpec, model: torch.nn.Module) -> list[str]:
    return method.ignored_layers if method.ignored_layers is not None else default_dense_layers(model)


class UnstructuredMethod:
    """Masks from a weight importance (magnitude or seeded noise), one-shot or on the gradual cubic schedule."""

    def __init__(self, pruner_class: type[MagnitudePruner] | type[RandomPruner], seeded: bool) -> None:
        self.pruner_class = pruner_class
        self.seeded = seeded

    def prune(
        self, dense_model: torch.nn.Module, method: MethodSpec, ratio: float, job: PruningJob, *, copy_model: bool
    ) -> PrunedModel:
        ignored = _ignored_layers(method, dense_model)
        model = copy.deepcopy(dense_model) if copy_model else dense_model
        fine_tuning = method.fine_tuning
        if method.schedule == "gradual":
            # Spec validation: a gradual schedule always has fine_tuning (and so the train split).
            assert fine_tuning is not None, "gradual pruning needs fine_tuning"
            masks = gradual_magnitude_prune(
                model,
                job.train_split.x,
                job.train_split.y,
                final_ratio=ratio,
                pruning_steps=method.pruning_steps,
                epochs_per_step=fine_tuning.epochs,
                scope=method.scope,
                ignored_layers=ignored,
                layer_ratios=method.layer_ratios,
                seed=job.seed,
                device=job.device,
                on_epoch=job.on_epoch,
                **_training(fine_tuning),
            )
        else:
            options = {"seed": job.seed} if self.seeded else {}
            pruner = self.pruner_class(
                scope=method.scope, ignored_layers=ignored, layer_ratios=method.layer_ratios, **options
            )
            masks = pruner.compute_masks(model, ratio)
            apply_masks(model, masks)
            if fine_tuning:
                finetune(
                    model,
                    job.train_split.x,
                    job.train_split.y,
                    epochs=fine_tuning.epochs,
                    seed=job.seed,
                    masks=masks,
                    device=job.device,
                    on_epoch=job.on_epoch,
                    **_training(fine_tuning),
                )
        return PrunedModel(model, masks, _recipe(method, ratio, ignored, job), sparsity(model, masks))


class ChannelMethod:
    """Filters and hidden units removed by L1/L2 norm (Torch-Pruning): always a new, smaller model."""

    def prune(
        self, dense_model: torch.nn.Module, method: MethodSpec, ratio: float, job: PruningJob, *, copy_model: bool
    ) -> PrunedModel:
        ignored = _ignored_layers(method, dense_model)
        pruner = ChannelPruner(
            norm=method.norm, scope=method.scope, ignored_layers=ignored, layer_ratios=method.layer_ratios
        )
        pruned = pruner.prune(dense_model, ratio)
        recipe = _recipe(method, ratio, ignored, job)
        if pruned.architecture is not None:  # an imported graph's is the pruned graph its run writes (measure)
            recipe["architecture"] = {"name": "pruned", **pruned.architecture}
        if method.fine_tuning:
            finetune(
                pruned.model,
                job.train_split.x,
                job.train_split.y,
                epochs=method.fine_tuning.epochs,
                seed=job.seed,
                device=job.device,
                on_epoch=job.on_epoch,
                **_training(method.fine_tuning),
            )
        dense_count = sum(p.numel() for p in dense_model.parameters())
        removed = 1 - sum(p.numel() for p in pruned.model.parameters()) / dense_count
        layer_report = {
            "overall": removed,
            "all_parameters": removed,
            "per_layer": {
                name: {"removed_channels": len(indices)} for name, indices in pruned.removed_channels.items()
            },
        }
        return PrunedModel(pruned.model, None, recipe, layer_report)


METHODS: dict[str, UnstructuredMethod | ChannelMethod] = {
    "magnitude": UnstructuredMethod(MagnitudePruner, seeded=False),
    "random": UnstructuredMethod(RandomPruner, seeded=True),
    "channel": ChannelMethod(),
}


def prune_model(
    dense_model: torch.nn.Module, method: MethodSpec, ratio: float, job: PruningJob, *, copy_model: bool = True
) -> PrunedModel:
    """A pruned copy of `dense_model`; with `copy_model=False` an unstructured method prunes `dense_model`
    itself (channel pruning always builds a new model)."""
    return METHODS[method.method].prune(dense_model, method, ratio, job, copy_model=copy_model)
