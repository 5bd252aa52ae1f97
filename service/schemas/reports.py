"""The fairness report. Accuracies are fractions (0.01 = one percentage point). A metric that is undefined
is null, and `undefined` says why; the JSON never holds NaN or infinity."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

REPORT_VERSION = "3"

Interval = tuple[float, float]


class _FromDetails(BaseModel):
    """Sections of a group row, each read from the same stored per-group details."""

    model_config = ConfigDict(extra="ignore")


class BoundaryProxies(_FromDetails):
    """Distance-to-boundary proxies (SCIENCE.md §2, E1–E7); `dense_` = dense model, else pruned."""

    dense_error_proxy: float | None = Field(None, description="mean(1 − p_y)")
    error_proxy: float | None = None
    dense_boundary_proximity: float | None = Field(None, description="mean p_y(1 − p_y); high = near the boundary")
    boundary_proximity: float | None = None
    dense_gini_impurity: float | None = Field(None, description="mean 1 − Σ p²")
    gini_impurity: float | None = None
    dense_logit_margin: float | None = Field(None, description="mean z_y − max_{z≠y} z; low = near the boundary")
    logit_margin: float | None = None


class Flips(_FromDetails):
    flips_correct_to_wrong: int = Field(description="dense right → pruned wrong")
    flips_wrong_to_correct: int = Field(description="dense wrong → pruned right")
    flips_any: int = Field(description="pruned prediction differs from the dense one")
    flips_correct_to_wrong_rate: float
    flips_wrong_to_correct_rate: float
    flips_any_rate: float


class Confusion(_FromDetails):
    dense_confusion: list[list[int]] | None = Field(None, description="rows = true class, columns = predicted")
    confusion: list[list[int]] | None = None


class BinaryRates(_FromDetails):
    """Binary tasks only (positive class = index 1), as Fairlearn defines them."""

    dense_selection_rate: float | None = None
    selection_rate: float | None = None
    dense_true_positive_rate: float | None = None
    true_positive_rate: float | None = None
    dense_false_positive_rate: float | None = None
    false_positive_rate: float | None = None


class ConfidenceIntervals(_FromDetails):
    """Paired, group-stratified bootstrap 95% percentile intervals over cached per-example outcomes."""

    dense_accuracy_ci: Interval | None = None
    accuracy_ci: Interval | None = None
    accuracy_drop_ci: Interval | None = None
    excess_accuracy_gap_ci: Interval | None = None
    excessive_loss_ci: Interval | None = None


class GroupDiagnostics(_FromDetails):
    """Why the group is hurt (Tran et al. 2022). `dense_` = at θd, else at θs (unmasked parameters only)."""

    dense_gradient_norm: float | None = Field(None, description="‖∇J_a(θd)‖ of the group's mean loss, exact")
    gradient_norm: float | None = None
    dense_hessian_trace: float | None = Field(None, description="Hutchinson estimate on a capped subsample")
    dense_hessian_trace_se: float | None = None
    dense_hessian_top_eigenvalue: float | None = Field(None, description="power iteration on HVPs")
    dense_eigenvalue_converged: bool | None = None
    hessian_trace: float | None = None
    hessian_trace_se: float | None = None
    hessian_top_eigenvalue: float | None = None
    eigenvalue_converged: bool | None = None
    curvature_examples: int | None = Field(None, description="examples of the group used for curvature")
    gradient_dot_delta: float | None = Field(None, description="g_a·δ, δ = θs − θd")
    delta_hessian_delta: float | None = Field(None, description="δᵀH_aδ over all of the group's examples")
    predicted_excessive_loss: float | None = Field(None, description="R̂(a) = g_a·δ + ½ δᵀH_aδ")
    bound_gradient_term: float | None = Field(None, description="‖g_a‖·‖δ‖ (Theorem 1)")
    bound_curvature_term: float | None = Field(None, description="½ λ_max(H_a)·‖δ‖² (Theorem 1)")


class GroupRow(BaseModel):
    group: str
    n: int
    share: float = Field(description="n / rows with a value for this attribute.")
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
    diagnostics: GroupDiagnostics
    undefined: dict[str, str] = Field(default_factory=dict, description="Why each null figure is null.")


class AttributeAggregates(BaseModel):
    loss_fairness_violation: float | None = Field(None, description="ξ = max R(a) − min R(a).")
    accuracy_fairness_violation: float | None = Field(None, description="max − min group accuracy of this model.")
    dense_accuracy_fairness_violation: float | None = None
    max_excess_accuracy_gap: float | None = Field(None, description="max ψa (Balancing Act's headline).")
    pairwise_disparity: float | None = Field(None, description="Ψ_PW = max ψa − min ψa.")
    accuracy_drop_std: float | None = Field(None, description="Sample std (n−1) of Δa over groups.")
    worst_group_accuracy: float | None = None
    worst_group: str | None = None
    max_accuracy_drop: float | None = None
    max_excess_accuracy_gap_ci: Interval | None = None
    demographic_parity_difference: float | None = Field(None, description="Binary tasks: max − min selection rate.")
    demographic_parity_ratio: float | None = Field(None, description="Binary tasks: min / max selection rate.")
    equalized_odds_difference: float | None = Field(None, description="Binary tasks: max(TPR spread, FPR spread).")
    dense_demographic_parity_difference: float | None = None
    dense_demographic_parity_ratio: float | None = None
    dense_equalized_odds_difference: float | None = None
    num_classes: int | None = None
    min_group_size: int
    small_groups: list[str]
    bootstrap_resamples: int
    bootstrap_seed: int


class RankCorrelation(BaseModel):
    rho: float | None
    reason: str | None = Field(None, description="Why rho is null.")


class MechanismDiagnostics(BaseModel):
    """Spearman correlations over groups: does the paper's mechanism explain this model's disparity?"""

    size_vs_dense_gradient_norm: RankCorrelation = Field(description="Tran Prop. 1 expects < 0.")
    dense_gradient_norm_vs_dense_hessian_trace: RankCorrelation = Field(description="Tran Fig. 6 expects > 0.")
    dense_accuracy_vs_accuracy_drop: RankCorrelation = Field(description="Tran expects < 0.")
    predicted_vs_excessive_loss: RankCorrelation = Field(description="R̂ against measured R; > 0 if R̂ explains R.")


class MetricItem(BaseModel):
    """A headline metric that describes itself, for pipelines that read metrics generically."""

    name: str
    value: float | None
    ci: Interval | None = Field(None, description="Bootstrap 95% interval, where computed.")
    n: int = Field(description="Examples the metric is computed over.")
    threshold: float | None = Field(None, description="The policy's limit, where one applies.")
    passed: bool | None = Field(None, description="value ≤ threshold, where a policy applies.")


class AttributeReport(BaseModel):
    attribute: str
    n_missing: int = Field(description="Rows without a value for this attribute (not in any group).")
    groups: list[GroupRow]
    aggregates: AttributeAggregates
    undefined: dict[str, str] = Field(default_factory=dict, description="Why each null aggregate is null.")
    caveats: dict[str, str] = Field(default_factory=dict, description="Reported values that rest on part of the data.")
    diagnostics: MechanismDiagnostics
    metrics: list[MetricItem] = Field(
        default_factory=list,
        description="Headline metrics of this attribute as self-describing items (pruned runs; the policy's "
        "thresholds apply over groups with at least min_group_size examples).",
    )


class OverallReport(BaseModel):
    n: int
    dense_accuracy: float
    accuracy: float
    dense_loss: float
    loss: float
    accuracy_drop: float
    excessive_loss: float


class PolicyCheck(BaseModel):
    name: str = Field(description="max_excess_accuracy_gap, max_worst_group_drop or max_accuracy_fairness_violation")
    attribute: str
    value: float | None = Field(description="Over groups with at least min_group_size examples; null if none.")
    threshold: float
    passed: bool


class RunVerdict(BaseModel):
    passed: bool
    reasons: list[str] = Field(description="Why the run fails, in words; empty when it passes.")
    checks: list[PolicyCheck]


class AuditVerdict(BaseModel):
    passed: bool = Field(description="Some method passes at some ratio.")
    highest_passing_ratio: dict[str, float | None] = Field(
        description="Per method: the highest ratio such that it and every lower ratio of the method pass; "
        "null when the lowest ratio already fails."
    )
    summary: str


class SplitAttributeReport(BaseModel):
    """One attribute on the train split: the same per-group rows and aggregates (diagnostics are computed on the
    evaluation split only, so the rows' diagnostics are null)."""

    attribute: str
    n_missing: int = Field(description="Train rows in no group of the evaluation split (or without a value).")
    groups: list[GroupRow]
    aggregates: AttributeAggregates
    undefined: dict[str, str] = Field(default_factory=dict)
    caveats: dict[str, str] = Field(default_factory=dict)


class SplitReport(BaseModel):
    overall: OverallReport
    attributes: list[SplitAttributeReport]


class MitigationPhase(BaseModel):
    when: str = Field(description="'before' pruning (on the dense model) or 'after' it.")
    attribute: str = Field(description="The attribute whose groups were constrained.")
    training_losses: list[float] = Field(description="Each epoch's mean training objective (the Lagrangian).")
    multipliers: dict[str, float] | None = Field(description="Final λ per group; null for finetune.")
    multiplier_history: list[dict[str, float] | None] = Field(description="λ per group after each epoch.")
    dual_steps: dict[str, int] | None = Field(
        description="Multiplier updates per group (ceag: mini-batches with the group's replay buffer full)."
    )
    seconds: float


class MitigationReport(BaseModel):
    """The mitigation as run: its options, the final multipliers (dual variables) and the wall time."""

    name: str = Field(description="finetune, equalized_loss or ceag.")
    placement: str
    attribute: str = Field(description="The attribute whose groups were constrained.")
    epochs: int
    lr: float
    batch_size: int
    optimizer: str
    momentum: float
    weight_decay: float
    dual_lr: float | None = Field(description="The multipliers' step size; null for finetune.")
    tolerance: float = Field(description="ceag's ε.")
    buffer_size: int = Field(description="ceag's replay buffer length k.")
    multipliers: dict[str, float] | None = Field(description="Final λ per group (last phase); null for finetune.")
    phases: list[MitigationPhase]
    seconds: float = Field(description="Wall time spent training under the mitigation.")


class RunReport(BaseModel):
    id: str
    label: str = Field(description="The method as configured, e.g. 'magnitude-global' or 'channel-layerwise-l1'; "
                       "mitigated runs add '+<mitigation>', e.g. 'magnitude-global+ceag'.")
    method: str = Field(description="'dense' for the baseline, else the pruning method.")
    scope: str | None
    ratio: float = Field(description="Requested fraction of prunable weights removed.")
    achieved_sparsity: float
    layer_sparsity: dict[str, dict]
    seconds: float
    delta_norm: float | None = Field(description="‖θs − θd‖ over trainable parameters; null for the dense baseline.")
    compression: dict = Field(
        description="'dense' and 'pruned': parameters, nonzero_parameters, MACs, safetensors file_bytes (and CPU "
        "latency at batch 1 and 64 for channel-pruned runs); 'ratios' = dense / pruned."
    )
    recipe: dict = Field(description="How the run was made: method, ratio, dense layers, seed, architecture.")
    weights_url: str | None = Field(description="The pruned weights (safetensors); upload with recipe.architecture.")
    notes: dict[str, str] = Field(description="What was not computed for this run, and why.")
    overall: OverallReport
    verdict: RunVerdict | None = Field(description="The policy's verdict; null for the dense baseline.")
    attributes: list[AttributeReport] = Field(
        description="One per group_by attribute, plus their intersection (named 'a&b') when there are several."
    )
    mitigation: str = Field("none", description="'none', or the mitigation trained on the pruned model.")
    mitigation_details: MitigationReport | None = Field(None, description="Null for unmitigated runs.")
    train: SplitReport | None = Field(
        None, description="The same figures on the train split, for audits with mitigations (Balancing Act reports "
        "that gains on the train split do not reliably carry over to unseen data: compare with `attributes`)."
    )


class ModelRef(BaseModel):
    id: str
    sha256: str
    architecture: dict
    parameter_count: int


class DatasetRef(BaseModel):
    id: str
    sha256: str
    rows: int
    classes: list[str]
    groups: dict[str, dict]


class AuditReport(BaseModel):
    report_version: str = REPORT_VERSION
    audit_id: str
    created_at: datetime
    finished_at: datetime | None
    spec: dict
    model: ModelRef
    dataset: DatasetRef
    environment: dict
    policy: dict = Field(description="The thresholds the verdicts apply (the spec's policy).")
    verdict: AuditVerdict
    dense: RunReport
    runs: list[RunReport] = Field(
        description="Per method, per ratio (increasing): the unmitigated run, then one run per mitigation."
    )
