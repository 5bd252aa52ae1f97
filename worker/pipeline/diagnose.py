"""Why groups are hurt (Tran et al. 2022; docs/METHODS.md §9–§13): per-group gradient norms and curvature of a model,
the directional terms along δ = θs − θd, and the figures and mechanism checks a run reports, all computed by
worker.engine's gradients, curvature, gauss_newton and directional modules. The dense model's figures are
computed once per audit; a run adds only its directional terms (and, on request, its own model's figures)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from results.attributes import AttributeMetrics, MechanismDiagnostics, RankCorrelation
from results.groups import GroupDiagnostics, GroupResult
from service.schemas.audits import DiagnosticsSpec
from worker.engine.curvature import MIN_PROBES, GroupCurvature, group_curvature
from worker.engine.directional import (
    GroupDirectional,
    bound_terms,
    delta_norm,
    group_directional,
    parameter_delta,
    predicted_excessive_loss,
)
from worker.engine.gauss_newton import GroupGaussNewton, group_gauss_newton_trace
from worker.engine.gradients import group_gradients
from worker.engine.pruning import Masks
from worker.engine.statistics import spearman
from worker.pipeline.data import Split

# Curvature costs HVPs over every group; "auto" skips it above this size and says so.
AUTO_CURVATURE_MAX_PARAMETERS = 5_000_000
LANCZOS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ModelDiagnostics:
    """Per grouping, per group code: one model's gradient norms, Hessian curvature and Gauss–Newton trace."""

    gradient_norms: list[np.ndarray] | None
    curvature: list[GroupCurvature] | None
    gauss_newton: list[GroupGaussNewton] | None


NOT_COMPUTED = ModelDiagnostics(None, None, None)


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


def estimators(options: DiagnosticsSpec, with_curvature: bool) -> dict[str, str]:
    """How each figure family was computed, in words, for the report."""
    described = {}
    if options.gradient_norms:
        described["gradient_norms"] = "exact: the gradient of each group's summed loss over all its examples, / n_a"
    if with_curvature:
        cap = options.max_examples_per_group
        described["hessian_trace"] = (
            f"Tr(QᵀHQ) over the Lanczos basis Q (exact) + Hutchinson with Rademacher probes projected off Q, on at "
            f"most {cap} examples per group; stops once the standard error is ≤ {options.trace_target_rse:g} of the "
            f"estimate (after {MIN_PROBES} probes), at most {options.hutchinson_probes} probes"
        )
        described["hessian_top_eigenvalue"] = (
            f"Lanczos with full reorthogonalisation on the same subsample, at most "
            f"{options.lanczos_steps} steps, until the residual bound is ≤ {LANCZOS_TOLERANCE:g}·|λ|"
        )
        described["gauss_newton_trace"] = (
            f"‖∇ℓ(x, ŷ)‖² with ŷ drawn from the model's prediction, per example, on at most "
            f"{options.sampled_examples_per_group} examples per group; error = their standard error"
        )
    described["directional"] = (
        f"g_a·δ and δᵀH_aδ at θd from per-example forward-mode derivatives on at most "
        f"{options.sampled_examples_per_group} examples per group (exact when the group is smaller)"
    )
    return described


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
    codes, sizes = [g.codes for g in groupings], [len(g.names) for g in groupings]
    norms = None
    if options.gradient_norms:
        gradients = group_gradients(model, None, split.x, split.y, codes, n_groups=sizes, masks=masks, device=device)
        norms = [g.norms for g in gradients]
    if not with_curvature:
        return ModelDiagnostics(norms, None, None)
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
            target_rse=options.trace_target_rse,
            lanczos_steps=options.lanczos_steps,
            tolerance=LANCZOS_TOLERANCE,
            max_examples=options.max_examples_per_group,
            seed=seed,
            device=device,
        )
        for g in groupings
    ]
    gauss_newton = group_gauss_newton_trace(
        model,
        None,
        split.x,
        split.y,
        codes,
        n_groups=sizes,
        masks=masks,
        max_examples=options.sampled_examples_per_group,
        seed=seed,
        device=device,
    )
    return ModelDiagnostics(norms, curvature, gauss_newton)


def direction(
    dense_model: torch.nn.Module,
    model: torch.nn.Module,
    split: Split,
    options: DiagnosticsSpec,
    *,
    seed: int,
    device: torch.device,
) -> Direction:
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
        max_examples=options.sampled_examples_per_group,
        seed=seed,
        device=device,
    )
    return Direction(terms, delta_norm(delta))


def _model_figures(prefix: str, model: ModelDiagnostics, k: int, code: int) -> dict:
    norms, curvature, gauss_newton = model.gradient_norms, model.curvature, model.gauss_newton
    hessian = curvature[k] if curvature else None
    sampled = gauss_newton[k] if gauss_newton else None
    return {
        f"{prefix}gradient_norm": float(norms[k][code]) if norms else None,
        f"{prefix}hessian_trace": float(hessian.trace[code]) if hessian else None,
        f"{prefix}hessian_trace_se": float(hessian.trace_se[code]) if hessian else None,
        f"{prefix}hessian_trace_probes": int(hessian.trace_probes[code]) if hessian else None,
        f"{prefix}hessian_top_eigenvalue": float(hessian.top_eigenvalue[code]) if hessian else None,
        f"{prefix}hessian_top_eigenvalue_error": float(hessian.top_eigenvalue_error[code]) if hessian else None,
        f"{prefix}eigenvalue_converged": bool(hessian.eigenvalue_converged[code]) if hessian else None,
        f"{prefix}gauss_newton_trace": float(sampled.trace[code]) if sampled else None,
        f"{prefix}gauss_newton_trace_se": float(sampled.trace_se[code]) if sampled else None,
    }


def _directional_figures(along: Direction | None, dense: ModelDiagnostics, k: int, n_groups: int) -> list[dict]:
    """R̂ with its error and the two Theorem-1 bound terms of every group code of grouping `k`."""
    if along is None:
        return [{} for _ in range(n_groups)]
    terms = along.terms[k]
    predicted = predicted_excessive_loss(terms.dot, terms.quadratic)
    norms = dense.gradient_norms[k] if dense.gradient_norms else None
    tops = dense.curvature[k].top_eigenvalue if dense.curvature else None
    absent = np.zeros(n_groups)
    gradient_term, curvature_term = bound_terms(
        norms if norms is not None else absent, tops if tops is not None else absent, along.norm
    )
    return [
        {
            "sampled_examples": int(terms.examples_used[code]),
            "gradient_dot_delta": float(terms.dot[code]),
            "gradient_dot_delta_se": float(terms.dot_se[code]),
            "delta_hessian_delta": float(terms.quadratic[code]),
            "delta_hessian_delta_se": float(terms.quadratic_se[code]),
            "predicted_excessive_loss": float(predicted[code]),
            "predicted_excessive_loss_se": float(terms.predicted_se[code]),
            "bound_gradient_term": float(gradient_term[code]) if norms is not None else None,
            "bound_curvature_term": float(curvature_term[code]) if tops is not None else None,
        }
        for code in range(n_groups)
    ]


def grouping_diagnostics(
    k: int, n_groups: int, dense: ModelDiagnostics, pruned: ModelDiagnostics, along: Direction | None
) -> list[GroupDiagnostics]:
    """The diagnostics of every group code of grouping `k`."""
    directional = _directional_figures(along, dense, k, n_groups)
    figures = []
    for code in range(n_groups):
        sampled = dense.gauss_newton[k].examples_used[code] if dense.gauss_newton else None
        figures.append(
            GroupDiagnostics(
                **_model_figures("dense_", dense, k, code),
                **_model_figures("", pruned, k, code),
                curvature_examples=int(dense.curvature[k].examples_used[code]) if dense.curvature else None,
                **{"sampled_examples": int(sampled) if sampled is not None else None, **directional[code]},
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
