"""One measure path for every run, the dense baseline included: evaluate the model on the evaluation split,
per-group metrics with their diagnostics, compression, the train split's figures with mitigations, and its
weights on disk. The dense baseline is measured once per audit and every run is compared with it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from results.attributes import AttributeMetrics, AttributeResult
from results.runs import MitigationDetails, RunResult, SplitResult
from worker.engine.metrics import attribute_metrics, overall_metrics
from worker.engine.outcomes import Outcomes, evaluate
from worker.engine.pruning import Masks
from worker.engine.structured import compare_models, model_cost
from worker.inputs import AuditInputs
from worker.pipeline.data import Split
from worker.pipeline.diagnose import (
    NOT_COMPUTED,
    Direction,
    ModelDiagnostics,
    diagnose_model,
    direction,
    estimators,
    grouping_diagnostics,
    mechanism,
    with_diagnostics,
)
from worker.pipeline.imported import write_run_graph

PRUNED_NOTE = (
    "the pruned model's own gradient norms and curvature were not computed (diagnostics.pruned_models = false); "
    "the dense model's figures and R̂ along δ explain the run"
)
CHANNEL_NOTE = "channel pruning removes parameters, so δ = θs − θd and R̂ are not defined for this run"


@dataclass(frozen=True)
class Baseline:
    """What every run of one audit is compared with, computed once: the dense model, its outcomes on both
    splits (`Split.dense`), its diagnostics and cost, and the audit-wide notes."""

    inputs: AuditInputs
    device: torch.device
    model: torch.nn.Module
    evaluation: Split
    train: Split | None
    diagnostics: ModelDiagnostics
    cost: dict
    with_curvature: bool
    notes: dict[str, str]

    @property
    def train_split(self) -> Split:
        """The train split, for mitigations and their train figures: spec validation requires train_dataset_id
        whenever mitigations are set, so it is there (with its dense outcomes)."""
        assert self.train is not None, "mitigations need the train split"
        return self.train

    @property
    def num_classes(self) -> int:
        return self.inputs.architecture["num_classes"]

    @property
    def input_shape(self) -> list[int]:
        return list(self.evaluation.x.shape[1:])


@dataclass(frozen=True)
class Candidate:
    """A model to measure and how it came about."""

    model: torch.nn.Module
    masks: Masks | None  # {} for the dense model; None for a physically pruned one
    label: str
    method: str
    scope: str | None
    ratio: float
    recipe: dict
    layer_report: dict
    mitigation: str = "none"
    mitigation_details: MitigationDetails | None = None


def split_attributes(baseline: Baseline, split: Split, outcomes: Outcomes) -> list[AttributeMetrics]:
    statistics, seed = baseline.inputs.spec.statistics, baseline.inputs.spec.seed
    return [
        attribute_metrics(
            g.attribute,
            split.dense_outcomes,
            outcomes,
            g.codes,
            g.names,
            num_classes=baseline.num_classes,
            min_group_size=statistics.min_group_size,
            bootstrap_resamples=statistics.bootstrap_resamples,
            seed=seed,
        )
        for g in split.groupings
    ]


def evaluation_attributes(
    baseline: Baseline, outcomes: Outcomes, pruned: ModelDiagnostics, along: Direction | None
) -> list[AttributeResult]:
    attributes = []
    for k, (grouping, metrics) in enumerate(
        zip(baseline.evaluation.groupings, split_attributes(baseline, baseline.evaluation, outcomes), strict=True)
    ):
        figures = grouping_diagnostics(k, len(grouping.names), baseline.diagnostics, pruned, along)
        metrics = metrics.model_copy(update={"groups": with_diagnostics(metrics.groups, grouping.names, figures)})
        attributes.append(AttributeResult(**dict(metrics), diagnostics=mechanism(metrics)))
    return attributes


def compression_report(baseline: Baseline, model: torch.nn.Module, physically_pruned: bool) -> dict:
    """Parameters, MACs and file size, dense vs pruned; CPU latency (batch 1 and 64) only where channels were
    removed: masked zeros run on the same dense kernels, so their latency is the dense model's."""
    if physically_pruned:
        return compare_models(baseline.model, model, baseline.input_shape, batch_sizes=(1, 64), repeats=5)
    pruned_cost = model_cost(model, baseline.input_shape)
    ratios = {
        key: baseline.cost[key] / pruned_cost[key]
        for key in ("parameters", "nonzero_parameters", "macs", "file_bytes")
        if pruned_cost[key]
    }
    return {"dense": baseline.cost, "pruned": pruned_cost, "ratios": ratios}


def measure(baseline: Baseline, candidate: Candidate, started: float, weights_path: Path | None) -> RunResult:
    """The run's result; its weights are written to `weights_path` (None for the dense baseline)."""
    is_dense = candidate.model is baseline.model
    inputs, model = baseline.inputs, candidate.model
    notes = dict(baseline.notes)
    if is_dense:
        outcomes, pruned, along = baseline.evaluation.dense_outcomes, baseline.diagnostics, None
    else:
        outcomes = evaluate(
            model,
            baseline.evaluation.x,
            baseline.evaluation.y,
            batch_size=inputs.spec.batch_size,
            device=baseline.device,
        )
        pruned, along = run_diagnostics(baseline, candidate, notes)
    attributes = evaluation_attributes(baseline, outcomes, pruned, along)
    recipe = candidate.recipe
    if weights_path is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, weights_path)
        if inputs.graph_path is not None:  # an imported ONNX model: its pruned graph too, downloadable as ONNX
            recipe = write_run_graph(
                inputs, model, recipe, candidate.masks is None, baseline.evaluation.x, weights_path.with_suffix(".onnx")
            )
    train = train_figures(baseline, model) if inputs.spec.mitigations else None
    compression = {"dense": baseline.cost} if is_dense else compression_report(baseline, model, candidate.masks is None)
    return RunResult(
        label=candidate.label,
        method=candidate.method,
        scope=candidate.scope,
        ratio=candidate.ratio,
        achieved_sparsity=candidate.layer_report["overall"],
        layer_sparsity=candidate.layer_report["per_layer"],
        seconds=time.perf_counter() - started,
        delta_norm=along.norm if along is not None else None,
        compression=compression,
        recipe=recipe,
        notes=notes,
        estimators=estimators(inputs.spec.diagnostics, baseline.with_curvature),
        overall=overall_metrics(baseline.evaluation.dense_outcomes, outcomes),
        attributes=attributes,
        mitigation=candidate.mitigation,
        mitigation_details=candidate.mitigation_details,
        train=train,
    )


def run_diagnostics(
    baseline: Baseline, candidate: Candidate, notes: dict[str, str]
) -> tuple[ModelDiagnostics, Direction | None]:
    """The pruned model's own figures (only with diagnostics.pruned_models) and R̂'s terms along its δ (only
    where δ is defined); says in `notes` what was left out."""
    options, seed, device = baseline.inputs.spec.diagnostics, baseline.inputs.spec.seed, baseline.device
    pruned = NOT_COMPUTED
    if options.pruned_models:
        pruned = diagnose_model(
            candidate.model,
            baseline.evaluation,
            options,
            seed=seed,
            device=device,
            with_curvature=baseline.with_curvature,
            masks=candidate.masks,
        )
    else:
        notes["pruned_model_diagnostics"] = PRUNED_NOTE
    if candidate.masks is None:
        notes["predicted_excessive_loss"] = CHANNEL_NOTE
        return pruned, None
    return pruned, direction(baseline.model, candidate.model, baseline.evaluation, options, seed=seed, device=device)


def train_figures(baseline: Baseline, model: torch.nn.Module) -> SplitResult:
    train = baseline.train_split
    outcomes = (
        train.dense_outcomes
        if model is baseline.model
        else evaluate(model, train.x, train.y, batch_size=baseline.inputs.spec.batch_size, device=baseline.device)
    )
    return SplitResult(
        overall=overall_metrics(train.dense_outcomes, outcomes), attributes=split_attributes(baseline, train, outcomes)
    )
