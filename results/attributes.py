"""One attribute (or the intersection of several, named 'a&b') on one split: its groups and the aggregates
over them. Definitions: docs/METHODS.md §4 (aggregates) and §13 (mechanism checks)."""

from __future__ import annotations

from pydantic import Field

from results.base import Interval, Result
from results.groups import GroupResult


class AttributeAggregates(Result):
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


class AttributeMetrics(Result):
    """The figures of one attribute on one split, as the engine computes them (no diagnostics)."""

    attribute: str
    n_missing: int = Field(description="Rows without a value for this attribute (not in any group).")
    groups: list[GroupResult]
    aggregates: AttributeAggregates
    undefined: dict[str, str] = Field(default_factory=dict, description="Why each null aggregate is null.")
    caveats: dict[str, str] = Field(default_factory=dict, description="Reported values that rest on part of the data.")


class RankCorrelation(Result):
    rho: float | None
    reason: str | None = Field(None, description="Why rho is null.")


class MechanismDiagnostics(Result):
    """Spearman correlations over groups: does the paper's mechanism explain this model's disparity?"""

    size_vs_dense_gradient_norm: RankCorrelation = Field(description="Tran Prop. 1 expects < 0.")
    dense_gradient_norm_vs_dense_hessian_trace: RankCorrelation = Field(description="Tran Fig. 6 expects > 0.")
    dense_accuracy_vs_accuracy_drop: RankCorrelation = Field(description="Tran expects < 0.")
    predicted_vs_excessive_loss: RankCorrelation = Field(description="R̂ against measured R; > 0 if R̂ explains R.")


class AttributeResult(AttributeMetrics):
    """An attribute on the evaluation split: its groups carry diagnostics, and the mechanism checks over them."""

    diagnostics: MechanismDiagnostics
