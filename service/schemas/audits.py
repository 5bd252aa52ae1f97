from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.models import AuditStatus


class PruningSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["magnitude"] = Field("magnitude", description="Unstructured magnitude pruning.")
    scope: Literal["global", "layerwise"] = Field(
        "global", description="global: one threshold over all prunable weights; layerwise: the same ratio per layer."
    )
    ratios: list[float] = Field(
        default_factory=lambda: [0.5, 0.7, 0.9],
        min_length=1,
        description="Fractions of prunable weights to remove; each run is compared with the dense model.",
    )
    ignored_layers: list[str] = Field(
        default_factory=list, description="Module names kept dense, e.g. ['layers.0'] (their weights are not pruned)."
    )

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float]) -> list[float]:
        for ratio in ratios:
            if not 0.0 < ratio < 1.0:
                raise ValueError(f"every ratio must lie strictly between 0 and 1; got {ratio}")
        if len(set(ratios)) != len(ratios):
            raise ValueError("ratios must not repeat")
        return sorted(ratios)


class DiagnosticsSpec(BaseModel):
    """Why a group is hurt (Tran et al. 2022): gradient norms, curvature, predicted excessive loss."""

    model_config = ConfigDict(extra="forbid")

    gradient_norms: bool = Field(True, description="Exact per-group gradient norm of the mean loss, dense and pruned.")
    curvature: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Hessian trace (Hutchinson) and top eigenvalue (power iteration) per group. 'auto' computes "
        "them for models up to 5M parameters and says so in the report when it skips them.",
    )
    hutchinson_probes: int = Field(32, ge=2, le=1000, description="Rademacher probes per group.")
    power_iterations: int = Field(20, ge=1, le=500, description="Power-iteration steps for the top eigenvalue.")
    max_examples_per_group: int = Field(512, ge=1, le=100_000, description="Seeded subsample cap for curvature.")


class StatisticsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap_resamples: int = Field(
        1000, ge=0, le=10_000, description="Paired, group-stratified bootstrap resamples for 95% CIs (0 = off)."
    )
    min_group_size: int = Field(30, ge=1, description="Groups smaller than this are flagged as unreliable.")


class AuditSpec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "0f6c0c3c5f3e4a0c9f51b0a1d2c3e4f5",
                    "dataset_id": "7a1b2c3d4e5f40718293a4b5c6d7e8f9",
                    "group_by": ["digit"],
                    "pruning": {"method": "magnitude", "scope": "global", "ratios": [0.5, 0.7, 0.9]},
                    "seed": 0,
                }
            ]
        },
    )

    model_id: str = Field(description="Id returned by POST /v1/models.")
    dataset_id: str = Field(description="Evaluation dataset id returned by POST /v1/datasets.")
    group_by: list[str] = Field(
        min_length=1, max_length=4,
        description="Group attributes of the dataset to report on; with several, their intersection is reported too.",
    )
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    @field_validator("group_by")
    @classmethod
    def _distinct_attributes(cls, group_by: list[str]) -> list[str]:
        if len(set(group_by)) != len(group_by):
            raise ValueError("group_by must not repeat an attribute")
        return group_by

    diagnostics: DiagnosticsSpec = Field(default_factory=DiagnosticsSpec)
    statistics: StatisticsSpec = Field(default_factory=StatisticsSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    batch_size: int = Field(512, ge=1, le=65536, description="Evaluation batch size.")


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: AuditStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: float = Field(description="Fraction of runs finished, 0 to 1.")
    progress_message: str | None
    attempts: int
    error: str | None = Field(description="Why the audit failed, in words.")
    spec: AuditSpec
    report_url: str | None = None


class AuditPage(BaseModel):
    items: list[AuditOut]
    total: int
    limit: int
    offset: int
