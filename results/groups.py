"""One group of one attribute on one split: its figures, grouped in sections as the report shows them.
Unprefixed figures are the pruned model's (θs), `dense_` ones the dense model's (θd). Definitions:
docs/METHODS.md §3 (core), §5 (proxies), §6 (flips, confusion), §7 (binary rates), §8 (intervals)."""

from __future__ import annotations

from pydantic import Field

from results.base import Interval, Result


class BoundaryProxies(Result):
    """Distance-to-boundary proxies, group means per model (docs/METHODS.md §5)."""

    dense_error_proxy: float | None = Field(None, description="mean(1 − p_y)")
    error_proxy: float | None = None
    dense_boundary_proximity: float | None = Field(None, description="mean p_y(1 − p_y); high = near the boundary")
    boundary_proximity: float | None = None
    dense_gini_impurity: float | None = Field(None, description="mean 1 − Σ p²")
    gini_impurity: float | None = None
    dense_logit_margin: float | None = Field(None, description="mean z_y − max_{z≠y} z; low = near the boundary")
    logit_margin: float | None = None


class Flips(Result):
    flips_correct_to_wrong: int = Field(description="dense right → pruned wrong")
    flips_wrong_to_correct: int = Field(description="dense wrong → pruned right")
    flips_any: int = Field(description="pruned prediction differs from the dense one")
    flips_correct_to_wrong_rate: float
    flips_wrong_to_correct_rate: float
    flips_any_rate: float


class Confusion(Result):
    dense_confusion: list[list[int]] | None = Field(None, description="rows = true class, columns = predicted")
    confusion: list[list[int]] | None = None


class BinaryRates(Result):
    """Binary tasks only (positive class = index 1), as Fairlearn defines them."""

    dense_selection_rate: float | None = None
    selection_rate: float | None = None
    dense_true_positive_rate: float | None = None
    true_positive_rate: float | None = None
    dense_false_positive_rate: float | None = None
    false_positive_rate: float | None = None


class ConfidenceIntervals(Result):
    """Paired, group-stratified bootstrap 95% percentile intervals over cached per-example outcomes."""

    dense_accuracy_ci: Interval | None = None
    accuracy_ci: Interval | None = None
    accuracy_drop_ci: Interval | None = None
    excess_accuracy_gap_ci: Interval | None = None
    excessive_loss_ci: Interval | None = None


class GroupDiagnostics(Result):
    """Why the group is hurt (Tran et al. 2022; docs/METHODS.md §10–§12). `dense_` = at θd, else at θs (unmasked
    parameters only; pruned-model figures only with diagnostics.pruned_models). Computed on the evaluation split
    only; null on the train split. Every estimate comes with its error; RunResult.estimators says how."""

    dense_gradient_norm: float | None = Field(None, description="‖∇J_a(θd)‖ of the group's mean loss, exact")
    gradient_norm: float | None = None
    dense_hessian_trace: float | None = Field(None, description="Hutchinson estimate on a capped subsample")
    dense_hessian_trace_se: float | None = Field(None, description="its standard error over the probes")
    dense_hessian_trace_probes: int | None = Field(None, description="probes drawn before the adaptive stop")
    dense_hessian_top_eigenvalue: float | None = Field(None, description="λ_max by Lanczos on the same subsample")
    dense_hessian_top_eigenvalue_error: float | None = Field(
        None, description="Lanczos residual bound: an eigenvalue of the subsample Hessian lies within it"
    )
    dense_eigenvalue_converged: bool | None = None
    dense_gauss_newton_trace: float | None = Field(
        None, description="Tr of the Gauss–Newton part of H_a (sampled labels, per-example gradients)"
    )
    dense_gauss_newton_trace_se: float | None = None
    hessian_trace: float | None = None
    hessian_trace_se: float | None = None
    hessian_trace_probes: int | None = None
    hessian_top_eigenvalue: float | None = None
    hessian_top_eigenvalue_error: float | None = None
    eigenvalue_converged: bool | None = None
    gauss_newton_trace: float | None = None
    gauss_newton_trace_se: float | None = None
    curvature_examples: int | None = Field(None, description="examples of the group used for the Hessian figures")
    sampled_examples: int | None = Field(
        None, description="examples of the group used for the Gauss–Newton trace and the directional terms"
    )
    gradient_dot_delta: float | None = Field(None, description="g_a·δ, δ = θs − θd")
    gradient_dot_delta_se: float | None = Field(None, description="0 when every example of the group was used")
    delta_hessian_delta: float | None = Field(None, description="δᵀH_aδ")
    delta_hessian_delta_se: float | None = None
    predicted_excessive_loss: float | None = Field(None, description="R̂(a) = g_a·δ + ½ δᵀH_aδ")
    predicted_excessive_loss_se: float | None = None
    bound_gradient_term: float | None = Field(None, description="‖g_a‖·‖δ‖ (Theorem 1)")
    bound_curvature_term: float | None = Field(None, description="½ λ_max(H_a)·‖δ‖² (Theorem 1)")


class GroupResult(Result):
    group: str
    n: int
    share: float = Field(description="n / all evaluated examples (those without a value for the attribute included).")
    dense_accuracy: float
    accuracy: float
    dense_loss: float
    loss: float
    accuracy_drop: float = Field(description="Δa = dense accuracy − pruned accuracy (positive = worse).")
    excess_accuracy_gap: float = Field(description="ψa = Δa − Δ, Δ the overall accuracy drop.")
    excessive_loss: float = Field(description="R(a) = pruned loss − dense loss on the group.")
    small_group: bool = Field(description="n below the spec's min_group_size: treat its numbers as unreliable.")
    confidence_intervals: ConfidenceIntervals
    boundary: BoundaryProxies
    flips: Flips
    confusion: Confusion
    binary: BinaryRates
    diagnostics: GroupDiagnostics = Field(default_factory=GroupDiagnostics)
    undefined: dict[str, str] = Field(
        default_factory=dict,
        description="Why each null figure is null: keyed by figure, or by a section (proxies, confusion, "
        "binary_rates, confidence_intervals) for all of its figures.",
    )
