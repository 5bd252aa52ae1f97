"""The fairness report: the audit's stored run results (results/) with what the API adds — ids, the weights
link, the policy's verdicts and headline metric items, and the model and dataset the audit used."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from results.attributes import AttributeResult
from results.base import Interval
from results.runs import RunResult

REPORT_VERSION = "3"


class MetricItem(BaseModel):
    """A headline metric that describes itself, for pipelines that read metrics generically."""

    name: str
    value: float | None
    ci: Interval | None = Field(None, description="Bootstrap 95% interval, where computed.")
    n: int = Field(description="Examples the metric is computed over.")
    threshold: float | None = Field(None, description="The policy's limit, where one applies.")
    passed: bool | None = Field(None, description="value ≤ threshold, where a policy applies.")


class AttributeReport(AttributeResult):
    metrics: list[MetricItem] = Field(
        default_factory=list,
        description="Headline metrics of this attribute as self-describing items (pruned runs; the policy's "
        "thresholds apply over groups with at least min_group_size examples).",
    )


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


class RunReport(RunResult):
    id: str
    worker: str | None = Field(
        description="The worker that computed the run (host and process id); null for runs stored before runs were "
        "fanned out across workers."
    )
    weights_url: str | None = Field(description="The pruned weights (safetensors); upload with recipe.architecture.")
    verdict: RunVerdict | None = Field(description="The policy's verdict; null for the dense baseline.")
    attributes: list[AttributeReport] = Field(
        description="One per group_by attribute, plus their intersection (named 'a&b') when there are several."
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
    changes: dict | None = Field(
        None,
        description="A scheduled audit: what moved since its schedule's previous audit (verdict, highest passing "
        "sparsity, worst group's ψ or drop beyond the schedule's change_threshold, groups newly below min size).",
    )
    dense: RunReport
    runs: list[RunReport] = Field(
        description="Per method, per ratio (increasing): the unmitigated run, then one run per mitigation."
    )


class RunRecipe(BaseModel):
    """How a run was made, enough to redo it: the method (its spec and label), the ratio, the layers kept dense,
    the seed, the mitigation (null when none) and the architecture JSON to upload its weights with."""

    model_config = ConfigDict(extra="allow")

    method: dict
    ratio: float
    ignored_layers: list[str]
    seed: int
    architecture: dict
    mitigation: dict | None = None
