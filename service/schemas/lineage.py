"""Lineage: naming a model or dataset by (name, version) instead of by id, and the catalog's list pages."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.catalog import DatasetOut, ModelOut
from service.schemas.common import Text

LATEST = "latest"


class ResourceRef(BaseModel):
    """A model or dataset by name and version; "latest" is the newest upload of that name when the audit is created
    (for a schedule: when it fires). The audit records the id it resolved to."""

    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=200, examples=["fraud-scorer"])
    version: Text = Field(LATEST, min_length=1, max_length=100, examples=["latest", "2026.12.01"])


class ModelPage(BaseModel):
    items: list[ModelOut]
    total: int
    limit: int
    offset: int


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    total: int
    limit: int
    offset: int
