"""One audit, start to finish, on plain values: load → dense baseline → for each ratio: prune → evaluate
per group → diagnose why (gradient norms, curvature, predicted excessive loss). No database, no Celery:
`worker.tasks` feeds it and stores what it returns."""

from __future__ import annotations

import copy
import dataclasses
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from worker.engine import diagnostics
from worker.engine.architectures import build_model, load_weights
from worker.engine.errors import EngineError
from worker.engine.metrics import (
    AttributeMetrics,
    OverallMetrics,
    Outcomes,
    attribute_metrics,
    evaluate,
    intersect,
    overall_metrics,
)
from safetensors.torch import save_file

from worker.engine.finetune import finetune, gradual_magnitude_prune
from worker.engine.mitigation import GroupBaseline, MitigationResult, mitigate
from worker.engine.pruning import MagnitudePruner, RandomPruner, apply_masks, default_dense_layers, sparsity
from worker.engine.statistics import spearman
from worker.engine.structured import ChannelPruner, compare_models, model_cost

# Curvature costs HVPs over every group for every model; "auto" skips it above this size and says so.
AUTO_CURVATURE_MAX_PARAMETERS = 5_000_000
SINGLE_THREAD_MAX_PARAMETERS = 1_000_000


@dataclass(frozen=True)
class AuditInputs:
    architecture: dict
    weights_path: Path
    dataset_dir: Path
    group_by: list[str]
    group_names: dict[str, list[str]]
    ratios: list[float]
    methods: list[dict]  # MethodSpec dumps, each with its "label"
    train_dataset_dir: Path | None
    output_dir: Path  # pruned weights of every run are written here
    seed: int
    batch_size: int
    diagnostics: dict
    statistics: dict
    device: str = "auto"
    mitigations: list[dict] = field(default_factory=list)  # MitigationSpec dumps with "label" and "step_size"
    train_group_names: dict[str, list[str]] = field(default_factory=dict)  # the train dataset's own group names


@dataclass(frozen=True)
class Grouping:
    """One attribute (or the intersection of several) as integer codes (−1 = missing) and names."""

    attribute: str
    codes: np.ndarray
    names: list[str]


@dataclass(frozen=True)
class ModelDiagnostics:
    """Per grouping, per group code: the model's gradient norms and (optionally) curvature."""

    gradient_norms: list[np.ndarray] | None
    curvature: list[diagnostics.GroupCurvature] | None


@dataclass(frozen=True)
class PrunedRun:
    """A pruned (and maybe fine-tuned) working model and what was done to get it."""

    model: torch.nn.Module
    masks: dict[str, torch.Tensor] | None  # None for physically pruned (channel) models
    recipe: dict
    layer_report: dict


@dataclass(frozen=True)
class TrainSplit:
    """The train dataset; with mitigations also its groups (renumbered to the evaluation split's names) and the
    dense model's outcomes on it, the baseline of every run's train-split figures."""

    x: np.ndarray
    y: np.ndarray
    groupings: list[Grouping] | None = None
    dense: Outcomes | None = None


@dataclass(frozen=True)
class SplitResult:
    """Overall and per-attribute figures of one model on the train split (no diagnostics there)."""

    overall: OverallMetrics
    attributes: list[AttributeMetrics]


@dataclass(frozen=True)
class RunResult:
    label: str
    method: str
    scope: str | None
    ratio: float
    achieved_sparsity: float
    layer_sparsity: dict
    seconds: float
    overall: OverallMetrics
    attributes: list[AttributeMetrics]
    group_diagnostics: dict[str, dict[str, dict]]  # attribute → group → diagnostic figures
    attribute_diagnostics: dict[str, dict]  # attribute → Spearman summaries
    delta_norm: float | None  # ‖θs − θd‖ over trainable parameters; None for the dense baseline
    recipe: dict = field(default_factory=dict)  # method, ratio, dense layers, architecture: how to redo it
    compression: dict = field(default_factory=dict)  # parameters, MACs, file size of the model evaluated
    weights_path: Path | None = None  # safetensors of the pruned model, under inputs.output_dir
    notes: dict[str, str] = field(default_factory=dict)  # what was not computed, and why
    mitigation: str = "none"
    mitigation_details: dict | None = None  # options, multipliers per group, epochs' losses, wall time
    train: SplitResult | None = None  # the same figures on the train split (audits with mitigations)


@dataclass(frozen=True)
class AuditResult:
    runs: list[RunResult]
    environment: dict


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_arrays(inputs: AuditInputs) -> tuple[np.ndarray, np.ndarray, list[Grouping]]:
    # Memory-mapped: the worker holds one copy of the dataset, the page cache's.
    x = np.load(inputs.dataset_dir / "x.npy", mmap_mode="r")
    y = np.load(inputs.dataset_dir / "y.npy", mmap_mode="r")
    groupings = [
        Grouping(a, np.asarray(np.load(inputs.dataset_dir / f"group_{a}.npy", mmap_mode="r")), inputs.group_names[a])
        for a in inputs.group_by
    ]
    if len(groupings) > 1:
        name, codes, names = intersect([(g.attribute, g.codes, g.names) for g in groupings])
        groupings.append(Grouping(name, codes, names))
    return x, y, groupings


def check_inputs_fit(architecture: dict, x: np.ndarray, y: np.ndarray) -> None:
    num_classes = architecture["num_classes"]
    if y.size and int(y.max()) >= num_classes:
        raise EngineError(f"labels go up to {int(y.max())} but the model has {num_classes} outputs")
    if "in_features" in architecture:  # an MLP, or a channel-pruned one: inputs are flattened
        features = int(np.prod(x.shape[1:]))
        if features != architecture["in_features"]:
            raise EngineError(f"model expects {architecture['in_features']} input features, dataset x has {features}")
    elif list(x.shape[1:]) != [architecture["in_channels"], architecture["image_size"], architecture["image_size"]]:
        raise EngineError(
            f"model expects input [{architecture['in_channels']}, {architecture['image_size']}, "
            f"{architecture['image_size']}] per example; dataset x has {list(x.shape[1:])}"
        )


def curvature_decision(options: dict, parameter_count: int) -> tuple[bool, str | None]:
    if options["curvature"] == "off":
        return False, "curvature was turned off in the spec (diagnostics.curvature = 'off')"
    if options["curvature"] == "auto" and parameter_count > AUTO_CURVATURE_MAX_PARAMETERS:
        return False, (
            f"curvature skipped: the model has {parameter_count} parameters, above the automatic limit of "
            f"{AUTO_CURVATURE_MAX_PARAMETERS}; set diagnostics.curvature = 'on' to compute it"
        )
    return True, None


def diagnose_model(model, x, y, groupings: list[Grouping], inputs: AuditInputs, device, *, masks=None,
                   with_curvature: bool) -> ModelDiagnostics:
    options = inputs.diagnostics
    norms = None
    if options["gradient_norms"]:
        gradients = diagnostics.group_gradients(
            model, None, x, y, [g.codes for g in groupings], n_groups=[len(g.names) for g in groupings],
            masks=masks, device=device,
        )
        norms = [g.norms for g in gradients]
    curvature = None
    if with_curvature:
        curvature = [
            diagnostics.group_curvature(
                model, None, x, y, g.codes, len(g.names), masks=masks, probes=options["hutchinson_probes"],
                power_iterations=options["power_iterations"], max_examples=options["max_examples_per_group"],
                seed=inputs.seed, device=device,
            )
            for g in groupings
        ]
    return ModelDiagnostics(norms, curvature)


def figures_by_group(
    groupings: list[Grouping], dense: ModelDiagnostics, pruned: ModelDiagnostics,
    directional: list[diagnostics.GroupDirectional] | None, delta_norm: float | None,
) -> dict[str, dict[str, dict]]:
    """Attribute → group name → the diagnostic figures of that group (None where not computed)."""
    result: dict[str, dict[str, dict]] = {}
    for k, grouping in enumerate(groupings):
        per_group = {}
        for code, name in enumerate(grouping.names):
            figures: dict[str, float | bool | int | None] = {}
            for prefix, model_diagnostics in (("dense_", dense), ("", pruned)):
                norms, curvature = model_diagnostics.gradient_norms, model_diagnostics.curvature
                figures[f"{prefix}gradient_norm"] = float(norms[k][code]) if norms else None
                figures[f"{prefix}hessian_trace"] = float(curvature[k].trace[code]) if curvature else None
                figures[f"{prefix}hessian_trace_se"] = float(curvature[k].trace_se[code]) if curvature else None
                figures[f"{prefix}hessian_top_eigenvalue"] = (
                    float(curvature[k].top_eigenvalue[code]) if curvature else None
                )
                figures[f"{prefix}eigenvalue_converged"] = (
                    bool(curvature[k].eigenvalue_converged[code]) if curvature else None
                )
            figures["curvature_examples"] = int(dense.curvature[k].examples_used[code]) if dense.curvature else None
            if directional is not None:
                dot, quadratic = float(directional[k].dot[code]), float(directional[k].quadratic[code])
                figures["gradient_dot_delta"] = dot
                figures["delta_hessian_delta"] = quadratic
                figures["predicted_excessive_loss"] = dot + 0.5 * quadratic
            else:
                figures["gradient_dot_delta"] = figures["delta_hessian_delta"] = None
                figures["predicted_excessive_loss"] = None
            norm, top = figures["dense_gradient_norm"], figures["dense_hessian_top_eigenvalue"]
            figures["bound_gradient_term"] = norm * delta_norm if norm is not None and delta_norm is not None else None
            figures["bound_curvature_term"] = (
                0.5 * top * delta_norm**2 if top is not None and delta_norm is not None else None
            )
            per_group[name] = figures
        result[grouping.attribute] = per_group
    return result


def spearman_summaries(attribute: AttributeMetrics, figures: dict[str, dict]) -> dict:
    """Does the paper's mechanism explain this model's disparity? Rank correlations over the groups."""
    groups = attribute.groups

    def column(name: str) -> list:
        return [figures[g.group][name] for g in groups]

    pairs = {
        "size_vs_dense_gradient_norm": ([g.n for g in groups], column("dense_gradient_norm")),
        "dense_gradient_norm_vs_dense_hessian_trace": (column("dense_gradient_norm"), column("dense_hessian_trace")),
        "dense_accuracy_vs_accuracy_drop": ([g.dense_accuracy for g in groups], [g.accuracy_drop for g in groups]),
        "predicted_vs_excessive_loss": (column("predicted_excessive_loss"), [g.excessive_loss for g in groups]),
    }
    summaries = {}
    for name, (a, b) in pairs.items():
        if any(v is None for v in a) or any(v is None for v in b):
            summaries[name] = {"rho": None, "reason": "an input was not computed for this audit"}
            continue
        rho, reason = spearman(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
        summaries[name] = {"rho": rho, "reason": reason}
    return summaries


def measure_run(
    label: str, method: str, scope: str | None, ratio: float, started: float, dense: Outcomes, pruned: Outcomes,
    groupings: list[Grouping], inputs: AuditInputs, num_classes: int, layer_report: dict,
    figures: dict[str, dict[str, dict]], notes: dict[str, str], delta_norm: float | None = None, **outputs,
) -> RunResult:
    statistics = inputs.statistics
    attributes = [
        attribute_metrics(
            g.attribute, dense, pruned, g.codes, g.names, num_classes=num_classes,
            min_group_size=statistics["min_group_size"], bootstrap_resamples=statistics["bootstrap_resamples"],
            seed=inputs.seed,
        )
        for g in groupings
    ]
    return RunResult(
        label=label,
        method=method,
        scope=scope,
        ratio=ratio,
        achieved_sparsity=layer_report["overall"],
        layer_sparsity=layer_report["per_layer"],
        seconds=time.perf_counter() - started,
        overall=overall_metrics(dense, pruned),
        attributes=attributes,
        group_diagnostics=figures,
        attribute_diagnostics={a.attribute: spearman_summaries(a, figures[a.attribute]) for a in attributes},
        delta_norm=delta_norm,
        notes=notes,
        **outputs,
    )


def aligned_codes(codes: np.ndarray, names: list[str], target_names: list[str]) -> np.ndarray:
    """Codes over `names` renumbered to `target_names` (matched by name); a name not there becomes −1."""
    index = {name: code for code, name in enumerate(target_names)}
    lookup = np.array([index.get(name, -1) for name in names] + [-1], dtype=np.int64)  # the last entry maps −1
    return lookup[codes]


def load_train_split(inputs: AuditInputs, groupings: list[Grouping]) -> TrainSplit | None:
    """The train arrays (memory-mapped); with mitigations, their groups under the evaluation split's names:
    a train group the evaluation split lacks counts as missing there."""
    if inputs.train_dataset_dir is None:
        return None
    x = np.load(inputs.train_dataset_dir / "x.npy", mmap_mode="r")
    y = np.load(inputs.train_dataset_dir / "y.npy", mmap_mode="r")
    if not inputs.mitigations:
        return TrainSplit(x, y)
    own = [(a, np.asarray(np.load(inputs.train_dataset_dir / f"group_{a}.npy", mmap_mode="r")),
            inputs.train_group_names[a]) for a in inputs.group_by]
    if len(own) > 1:
        own.append(intersect(own))
    train_groupings = [
        Grouping(target.attribute, aligned_codes(codes, names, target.names), target.names)
        for (_, codes, names), target in zip(own, groupings, strict=True)
    ]
    return TrainSplit(x, y, train_groupings)


def split_metrics(model, train: TrainSplit, inputs: AuditInputs, num_classes: int, device) -> SplitResult:
    outcomes = evaluate(model, train.x, train.y, batch_size=inputs.batch_size, device=device)
    statistics = inputs.statistics
    return SplitResult(
        overall=overall_metrics(train.dense, outcomes),
        attributes=[
            attribute_metrics(
                g.attribute, train.dense, outcomes, g.codes, g.names, num_classes=num_classes,
                min_group_size=statistics["min_group_size"],
                bootstrap_resamples=statistics["bootstrap_resamples"], seed=inputs.seed,
            )
            for g in train.groupings
        ],
    )


def prune_model(dense_model: torch.nn.Module, method: dict, ratio: float, inputs: AuditInputs,
                train: TrainSplit | None, device, on_epoch, *, copy_model: bool = True) -> PrunedRun:
    """A pruned copy of `dense_model`, fine-tuned if the method asks; with `copy_model=False` an unstructured
    method prunes `dense_model` itself (channel pruning always builds a new, smaller model)."""
    ignored = method["ignored_layers"] if method["ignored_layers"] is not None else default_dense_layers(dense_model)
    recipe = {"method": method, "ratio": ratio, "ignored_layers": ignored, "seed": inputs.seed,
              "architecture": inputs.architecture}
    fine_tuning = method["fine_tuning"]
    training = {k: fine_tuning[k] for k in ("lr", "batch_size", "optimizer", "momentum", "weight_decay")} \
        if fine_tuning else {}
    if method["method"] == "channel":
        pruner = ChannelPruner(norm=method["norm"], scope=method["scope"], ignored_layers=ignored,
                               layer_ratios=method["layer_ratios"])
        pruned = pruner.prune(dense_model, ratio)
        recipe["architecture"] = {"name": "pruned", **pruned.architecture}
        if fine_tuning:
            finetune(pruned.model, train.x, train.y, epochs=fine_tuning["epochs"], seed=inputs.seed, device=device,
                     on_epoch=on_epoch, **training)
        dense_count = sum(p.numel() for p in dense_model.parameters())
        removed = 1 - sum(p.numel() for p in pruned.model.parameters()) / dense_count
        layer_report = {"overall": removed, "all_parameters": removed,
                        "per_layer": {name: {"removed_channels": len(indices)}
                                      for name, indices in pruned.removed_channels.items()}}
        return PrunedRun(pruned.model, None, recipe, layer_report)
    model = copy.deepcopy(dense_model) if copy_model else dense_model
    if method["schedule"] == "gradual":
        masks = gradual_magnitude_prune(
            model, train.x, train.y, final_ratio=ratio, pruning_steps=method["pruning_steps"],
            epochs_per_step=fine_tuning["epochs"], scope=method["scope"], ignored_layers=ignored,
            layer_ratios=method["layer_ratios"], seed=inputs.seed, device=device, on_epoch=on_epoch, **training,
        )
    else:
        pruner_class = MagnitudePruner if method["method"] == "magnitude" else RandomPruner
        options = {"seed": inputs.seed} if method["method"] == "random" else {}
        pruner = pruner_class(scope=method["scope"], ignored_layers=ignored, layer_ratios=method["layer_ratios"],
                              **options)
        masks = pruner.compute_masks(model, ratio)
        apply_masks(model, masks)
        if fine_tuning:
            finetune(model, train.x, train.y, epochs=fine_tuning["epochs"], seed=inputs.seed, masks=masks,
                     device=device, on_epoch=on_epoch, **training)
    return PrunedRun(model, masks, recipe, sparsity(model, masks))


def compression_report(dense_model, dense_cost: dict, model, input_shape: list[int], physically_pruned: bool) -> dict:
    """Parameters, MACs and file size, dense vs pruned; CPU latency (batch 1 and 64) only where channels were
    removed: masked zeros run on the same dense kernels, so their latency is the dense model's."""
    if physically_pruned:
        return compare_models(dense_model, model, input_shape, batch_sizes=(1, 64), repeats=5)
    pruned_cost = model_cost(model, input_shape)
    ratios = {key: dense_cost[key] / pruned_cost[key] for key in ("parameters", "nonzero_parameters", "macs",
                                                                  "file_bytes") if pruned_cost[key]}
    return {"dense": dense_cost, "pruned": pruned_cost, "ratios": ratios}


@dataclass
class AuditContext:
    """What every run of one audit shares: inputs, data, the dense model and its measurements."""

    inputs: AuditInputs
    device: torch.device
    dense_model: torch.nn.Module
    x: np.ndarray
    y: np.ndarray
    groupings: list[Grouping]
    train: TrainSplit | None
    dense: Outcomes
    dense_diagnostics: ModelDiagnostics
    dense_cost: dict
    with_curvature: bool
    notes: dict[str, str]
    num_classes: int
    input_shape: list[int]


def measure_model(context: AuditContext, model, masks, *, label: str, method: dict, ratio: float, started: float,
                  recipe: dict, layer_report: dict, weights_path: Path, mitigation: str = "none",
                  mitigation_details: dict | None = None) -> RunResult:
    """Evaluate a pruned (maybe mitigated) model like every other run: per-group metrics on the evaluation split
    (and the train split with mitigations), diagnostics, R̂, compression; its weights are written to `weights_path`."""
    c = context
    pruned = evaluate(model, c.x, c.y, batch_size=c.inputs.batch_size, device=c.device)
    pruned_diagnostics = diagnose_model(model, c.x, c.y, c.groupings, c.inputs, c.device, masks=masks,
                                        with_curvature=c.with_curvature)
    run_notes = dict(c.notes)
    if masks is None:
        directional, norm = None, None
        run_notes["predicted_excessive_loss"] = (
            "channel pruning removes parameters, so δ = θs − θd and R̂ are not defined for this run"
        )
    else:
        delta = diagnostics.parameter_delta(dict(c.dense_model.named_parameters()), dict(model.named_parameters()))
        # R̂(a) = g_a·δ + ½ δᵀH_aδ at the dense parameters (Tran Eq. 4), one pass for all groups.
        directional = diagnostics.group_directional(
            c.dense_model, None, c.x, c.y, [g.codes for g in c.groupings], delta,
            n_groups=[len(g.names) for g in c.groupings], device=c.device,
        )
        norm = diagnostics.delta_norm(delta)
    figures = figures_by_group(c.groupings, c.dense_diagnostics, pruned_diagnostics, directional, norm)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, weights_path)
    train = split_metrics(model, c.train, c.inputs, c.num_classes, c.device) if c.inputs.mitigations else None
    return measure_run(
        label, method["method"], method["scope"], ratio, started, c.dense, pruned, c.groupings, c.inputs,
        c.num_classes, layer_report, figures, run_notes, norm, recipe=recipe, weights_path=weights_path,
        compression=compression_report(c.dense_model, c.dense_cost, model, c.input_shape, masks is None),
        mitigation=mitigation, mitigation_details=mitigation_details, train=train,
    )


def constrained_grouping(context: AuditContext, mitigation: dict) -> Grouping:
    """The train-split grouping a mitigation constrains: its `attribute`, else the last reported one (the
    intersection when group_by has several attributes)."""
    groupings = context.train.groupings
    if mitigation["attribute"] is None:
        return groupings[-1]
    return next(g for g in groupings if g.attribute == mitigation["attribute"])


def mitigation_phase(context: AuditContext, model, masks, mitigation: dict, when: str, on_epoch) -> dict:
    """Train `model` in place under `mitigation`; what it did, with multipliers named by group."""
    grouping = constrained_grouping(context, mitigation)
    n_groups = len(grouping.names)
    baseline = GroupBaseline.from_outcomes(context.train.dense, grouping.codes, n_groups) \
        if mitigation["name"] == "ceag" else None
    result: MitigationResult = mitigate(
        model, context.train.x, context.train.y, grouping.codes, n_groups, name=mitigation["name"],
        epochs=mitigation["epochs"], lr=mitigation["lr"], batch_size=mitigation["batch_size"],
        optimizer=mitigation["optimizer"], momentum=mitigation["momentum"],
        weight_decay=mitigation["weight_decay"], dual_lr=mitigation["step_size"],
        tolerance=mitigation["tolerance"], buffer_size=mitigation["buffer_size"], baseline=baseline,
        masks=masks, seed=context.inputs.seed, device=context.device, on_epoch=on_epoch,
    )

    def named(values) -> dict[str, float] | None:
        return None if values is None else dict(zip(grouping.names, map(float, values), strict=True))

    return {
        "when": when,
        "attribute": grouping.attribute,
        "training_losses": result.losses,
        "multipliers": named(result.multipliers),
        "multiplier_history": [named(values) for values in result.multiplier_history],
        "dual_steps": None if result.dual_steps is None else dict(zip(grouping.names, map(int, result.dual_steps),
                                                                      strict=True)),
        "seconds": result.seconds,
    }


def mitigated_model(context: AuditContext, method: dict, ratio: float, unmitigated: PrunedRun,
                    unmitigated_weights: Path, mitigation: dict, on_epoch) -> tuple[PrunedRun, dict]:
    """The pruned model trained under `mitigation`. 'after' starts from the unmitigated run's saved weights and
    masks; 'before' trains a copy of the dense model under the constraints and prunes that; 'both' does both."""
    phases = []
    if mitigation["placement"] == "after":
        model = build_model(unmitigated.recipe["architecture"])
        load_weights(model, unmitigated_weights)
        model.to(context.device)
        run = PrunedRun(model, unmitigated.masks, unmitigated.recipe, unmitigated.layer_report)
    else:
        fair_dense = copy.deepcopy(context.dense_model)
        phases.append(mitigation_phase(context, fair_dense, None, mitigation, "before", on_epoch))
        run = prune_model(fair_dense, method, ratio, context.inputs, context.train, context.device, on_epoch,
                          copy_model=False)
        del fair_dense
    if mitigation["placement"] in ("after", "both"):
        phases.append(mitigation_phase(context, run.model, run.masks, mitigation, "after", on_epoch))
    layer_report = sparsity(run.model, run.masks) if run.masks is not None else run.layer_report
    options = {k: v for k, v in mitigation.items() if k not in ("label", "step_size")}
    details = {
        **options,
        "dual_lr": mitigation["step_size"] if mitigation["name"] != "finetune" else None,
        "attribute": phases[-1]["attribute"],
        "multipliers": phases[-1]["multipliers"],
        "phases": phases,
        "seconds": sum(phase["seconds"] for phase in phases),
    }
    recipe = {**run.recipe, "mitigation": options}
    return PrunedRun(run.model, run.masks, recipe, layer_report), details


@contextmanager
def intra_op_threads(parameter_count: int, device: torch.device) -> Iterator[None]:
    """One CPU thread for small models: their matrix products are too small to split, and a second thread
    only spins, which on a shared 2-core machine under load made an audit of a 3-layer MLP 17× slower
    (195 s against 11.7 s, arrests, profiled under `make reproduce`)."""
    if device.type != "cpu" or parameter_count > SINGLE_THREAD_MAX_PARAMETERS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_audit_pipeline(inputs: AuditInputs, on_progress: Callable[[float, str], None]) -> AuditResult:
    torch.manual_seed(inputs.seed)
    device = select_device(inputs.device)
    dense_model = build_model(inputs.architecture)
    load_weights(dense_model, inputs.weights_path)
    dense_model.to(device)
    with intra_op_threads(sum(p.numel() for p in dense_model.parameters()), device):
        return audit_dense_model(inputs, dense_model, device, on_progress)


def audit_dense_model(inputs: AuditInputs, dense_model: torch.nn.Module, device: torch.device,
                      on_progress: Callable[[float, str], None]) -> AuditResult:
    x, y, groupings = load_arrays(inputs)
    check_inputs_fit(inputs.architecture, x, y)
    train = load_train_split(inputs, groupings)
    if train is not None:
        check_inputs_fit(inputs.architecture, train.x, train.y)
    if inputs.mitigations:
        train = dataclasses.replace(train, dense=evaluate(dense_model, train.x, train.y,
                                                          batch_size=inputs.batch_size, device=device))
    parameter_count = sum(p.numel() for p in dense_model.parameters())
    with_curvature, curvature_note = curvature_decision(inputs.diagnostics, parameter_count)
    notes = {"curvature": curvature_note} if curvature_note else {}
    total_steps = len(inputs.ratios) * len(inputs.methods) * (1 + len(inputs.mitigations)) + 1

    started = time.perf_counter()
    dense = evaluate(dense_model, x, y, batch_size=inputs.batch_size, device=device)
    dense_diagnostics = diagnose_model(dense_model, x, y, groupings, inputs, device, with_curvature=with_curvature)
    context = AuditContext(inputs, device, dense_model, x, y, groupings, train, dense, dense_diagnostics,
                           model_cost(dense_model, list(x.shape[1:])), with_curvature, notes,
                           inputs.architecture["num_classes"], list(x.shape[1:]))
    figures = figures_by_group(groupings, dense_diagnostics, dense_diagnostics, None, None)
    runs = [measure_run("dense", "dense", None, 0.0, started, dense, dense, groupings, inputs, context.num_classes,
                        sparsity(dense_model, {}), figures, notes, compression={"dense": context.dense_cost},
                        train=split_metrics(dense_model, train, inputs, context.num_classes, device)
                        if inputs.mitigations else None)]
    on_progress(1 / total_steps, "dense baseline evaluated")

    step = 1
    for method in inputs.methods:
        for ratio in inputs.ratios:
            message = f"{method['label']} at ratio {ratio:g}"

            def on_epoch(epoch: int, _loss: float) -> None:
                on_progress(step / total_steps, f"{message}: epoch {epoch}")

            started = time.perf_counter()
            pruned_run = prune_model(dense_model, method, ratio, inputs, train, device, on_epoch)
            unmitigated_weights = inputs.output_dir / f"run-{step}.safetensors"
            runs.append(measure_model(context, pruned_run.model, pruned_run.masks, label=method["label"],
                                      method=method, ratio=ratio, started=started, recipe=pruned_run.recipe,
                                      layer_report=pruned_run.layer_report, weights_path=unmitigated_weights))
            # The worker holds the dense model and one working copy at a time; mitigations reload these weights.
            pruned_run = dataclasses.replace(pruned_run, model=None)
            step += 1
            on_progress(step / total_steps, f"{message} evaluated")
            for mitigation in inputs.mitigations:
                message = f"{method['label']} at ratio {ratio:g}, {mitigation['label']}"
                started = time.perf_counter()
                mitigated, details = mitigated_model(context, method, ratio, pruned_run, unmitigated_weights,
                                                     mitigation, on_epoch)
                runs.append(measure_model(
                    context, mitigated.model, mitigated.masks, label=f"{method['label']}+{mitigation['label']}",
                    method=method, ratio=ratio, started=started, recipe=mitigated.recipe,
                    layer_report=mitigated.layer_report, weights_path=inputs.output_dir / f"run-{step}.safetensors",
                    mitigation=mitigation["name"], mitigation_details=details,
                ))
                del mitigated
                step += 1
                on_progress(step / total_steps, f"{message} evaluated")

    environment = {
        "pruneaudit": version("pruneaudit"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    return AuditResult(runs=runs, environment=environment)
