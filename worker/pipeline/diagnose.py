"""Why groups are hurt (Tran et al. 2022; docs/METHODS.md §9–§13): per-group gradient norms and curvature of a model,
the directional terms along δ = θs − θd, and the figures and mechanism checks a run reports, all computed by
worker.engine's gradients, curvature and directional modules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from results.attributes import AttributeMetrics, MechanismDiagnostics, RankCorrelation
from results.groups import GroupDiagnostics, GroupResult
from service.schemas.audits import DiagnosticsSpec
from worker.engine.curvature import GroupCurvature, group_curvature
from worker.engine.directional import (
    GroupDirectional,
    bound_terms,
    delta_norm,
    group_directional,
    parameter_delta,
    predicted_excessive_loss,
)
from worker.engine.gradients import group_gradients
from worker.engine.pruning import Masks
from worker.engine.statistics import spearman
from worker.pipeline.data import Split

# Curvature costs HVPs over every group for every model; "auto" skips it above this size and says so.
AUTO_CURVATURE_MAX_PARAMETERS = 5_000_000


@dataclass(frozen=True)
class ModelDiagnostics:
    """Per grouping, per group code: one model's gradient norms and (optionally) curvature."""

    gradient_norms: list[np.ndarray] | None
    curvature: list[GroupCurvature] | None


@dataclass(frozen=True)
class Direction:
    """g_a·δ and δᵀH_aδ at the dense parameters per grouping, and ‖δ‖."""

    terms: list[GroupDirectional]
    norm: float


def curvature_decision(options: DiagnosticsSpec, parameter_count: int) -> tuple[bool, str | None]:
    if options.curvature == "off":
        return False, "curvature was turned off in the spec (diagnostics.curvature = 'off')"
    if options.curvature == "auto" and parameter_count > AUTO_CURVATURE_MAX_PARAMETERS:
        return False, (
            f"curvature skipped: the model has {parameter_count} parameters, above the automatic limit of "
            f"{AUTO_CURVATURE_MAX_PARAMETERS}; set diagnostics.curvature = 'on' to compute it"
        )
    return True, None


def diagnose_model(
    model: torch.nn.Module,
    split: Split,
    options: DiagnosticsSpec,
    *,
    seed: int,
    device: torch.device,
    with_curvature: bool,
    masks: Masks | None = None,
) -> ModelDiagnostics:
    groupings = split.groupings
    norms = None
    if options.gradient_norms:
        gradients = group_gradients(
            model,
            None,
            split.x,
            split.y,
            [g.codes for g in groupings],
            n_groups=[len(g.names) for g in groupings],
            masks=masks,
            device=device,
        )
        norms = [g.norms for g in gradients]
    curvature = None
    if with_curvature:
        curvature = [
            group_curvature(
                model,
                None,
                split.x,
                split.y,
                g.codes,
                len(g.names),
                masks=masks,
                probes=options.hutchinson_probes,
                power_iterations=options.power_iterations,
                max_examples=options.max_examples_per_group,
                seed=seed,
                device=device,
            )
            for g in groupings
        ]
    return ModelDiagnostics(norms, curvature)


def direction(dense_model: torch.nn.Module, model: torch.nn.Module, split: Split, device: torch.device) -> Direction:
    """R̂(a) = g_a·δ + ½ δᵀH_aδ needs both terms at the dense parameters (Tran Eq. 4): one pass for all groups."""
    delta = parameter_delta(dict(dense_model.named_parameters()), dict(model.named_parameters()))
    terms = group_directional(
        dense_model,
        None,
        split.x,
        split.y,
        [g.codes for g in split.groupings],
        delta,
        n_groups=[len(g.names) for g in split.groupings],
        device=device,
    )
    return Direction(terms, delta_norm(delta))


def _model_figures(prefix: str, model: ModelDiagnostics, k: int, code: int) -> dict:
    norms, curvature = model.gradient_norms, model.curvature
    return {
        f"{prefix}gradient_norm": float(norms[k][code]) if norms else None,
        f"{prefix}hessian_trace": float(curvature[k].trace[code]) if curvature else None,
        f"{prefix}hessian_trace_se": float(curvature[k].trace_se[code]) if curvature else None,
        f"{prefix}hessian_top_eigenvalue": float(curvature[k].top_eigenvalue[code]) if curvature else None,
        f"{prefix}eigenvalue_converged": bool(curvature[k].eigenvalue_converged[code]) if curvature else None,
    }


def grouping_diagnostics(
    k: int, n_groups: int, dense: ModelDiagnostics, pruned: ModelDiagnostics, along: Direction | None
) -> list[GroupDiagnostics]:
    """The diagnostics of every group code of grouping `k`."""
    predicted = bound_gradient = bound_curvature = None
    if along is not None:
        terms = along.terms[k]
        predicted = predicted_excessive_loss(terms.dot, terms.quadratic)
        norms = dense.gradient_norms[k] if dense.gradient_norms else None
        tops = dense.curvature[k].top_eigenvalue if dense.curvature else None
        absent = np.zeros(n_groups)
        gradient_term, curvature_term = bound_terms(
            norms if norms is not None else absent, tops if tops is not None else absent, along.norm
        )
        bound_gradient = gradient_term if norms is not None else None
        bound_curvature = curvature_term if tops is not None else None
    figures = []
    for code in range(n_groups):
        figures.append(
            GroupDiagnostics(
                **_model_figures("dense_", dense, k, code),
                **_model_figures("", pruned, k, code),
                curvature_examples=int(dense.curvature[k].examples_used[code]) if dense.curvature else None,
                gradient_dot_delta=float(along.terms[k].dot[code]) if along else None,
                delta_hessian_delta=float(along.terms[k].quadratic[code]) if along else None,
                predicted_excessive_loss=float(predicted[code]) if predicted is not None else None,
                bound_gradient_term=float(bound_gradient[code]) if bound_gradient is not None else None,
                bound_curvature_term=float(bound_curvature[code]) if bound_curvature is not None else None,
            )
        )
    return figures


def with_diagnostics(groups: list[GroupResult], names: list[str], figures: list[GroupDiagnostics]) -> list[GroupResult]:
    """The groups (those with examples, in the attribute's order) with their diagnostics filled in."""
    by_name = dict(zip(names, figures, strict=True))
    return [group.model_copy(update={"diagnostics": by_name[group.group]}) for group in groups]


def mechanism(attribute: AttributeMetrics) -> MechanismDiagnostics:
    """Does the paper's mechanism explain this model's disparity? Rank correlations over the groups."""
    groups = attribute.groups

    def column(name: str) -> list:
        return [getattr(g.diagnostics, name) for g in groups]

    pairs = {
        "size_vs_dense_gradient_norm": ([g.n for g in groups], column("dense_gradient_norm")),
        "dense_gradient_norm_vs_dense_hessian_trace": (column("dense_gradient_norm"), column("dense_hessian_trace")),
        "dense_accuracy_vs_accuracy_drop": ([g.dense_accuracy for g in groups], [g.accuracy_drop for g in groups]),
        "predicted_vs_excessive_loss": (column("predicted_excessive_loss"), [g.excessive_loss for g in groups]),
    }
    correlations = {}
    for name, (a, b) in pairs.items():
        if any(v is None for v in a) or any(v is None for v in b):
            correlations[name] = RankCorrelation(rho=None, reason="an input was not computed for this audit")
            continue
        rho, reason = spearman(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
        correlations[name] = RankCorrelation(rho=rho, reason=reason)
    return MechanismDiagnostics(**correlations)
