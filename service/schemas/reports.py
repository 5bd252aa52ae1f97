"""The fairness report. Accuracies are fractions (0.01 = one percentage point). A metric that is undefined
is null, and `undefined` says why; the JSON never holds NaN or infinity."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

REPORT_VERSION = "1"


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


class AttributeReport(BaseModel):
    attribute: str
    n_missing: int = Field(description="Rows without a value for this attribute (not in any group).")
    groups: list[GroupRow]
    aggregates: AttributeAggregates
    undefined: dict[str, str] = Field(default_factory=dict, description="Why each null aggregate is null.")


class OverallReport(BaseModel):
    n: int
    dense_accuracy: float
    accuracy: float
    dense_loss: float
    loss: float
    accuracy_drop: float
    excessive_loss: float


class RunReport(BaseModel):
    id: str
    method: str = Field(description="'dense' for the baseline, else the pruning method.")
    scope: str | None
    ratio: float = Field(description="Requested fraction of prunable weights removed.")
    achieved_sparsity: float
    layer_sparsity: dict[str, dict]
    seconds: float
    overall: OverallReport
    attributes: list[AttributeReport]


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
    dense: RunReport
    runs: list[RunReport] = Field(description="One per pruning ratio, in increasing order.")
