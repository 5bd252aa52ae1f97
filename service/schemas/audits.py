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
    group_by: list[str] = Field(min_length=1, description="Group attributes of the dataset to report on.")
    pruning: PruningSpec = Field(default_factory=PruningSpec)
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
