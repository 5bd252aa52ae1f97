from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    created_at: datetime
    name: str | None
    version: str | None = None
    labels: dict[str, str] | None = None
    sha256: str = Field(
        description="sha256 of the stored safetensors file (for a .pt upload, the safetensors "
        "converted from it); the file is stored under it."
    )
    size_bytes: int
    architecture: dict = Field(examples=[{"name": "mlp", "in_features": 64, "hidden": [128, 64], "num_classes": 10}])
    parameter_count: int
    input_shape: list[int] = Field(description="Shape of one example, without the batch dimension.")
    num_classes: int


class GroupSizes(BaseModel):
    names: list[str]
    sizes: list[int]
    missing: int = Field(description="Rows whose value of this attribute is missing.")


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    created_at: datetime
    name: str | None
    version: str | None = None
    labels: dict[str, str] | None = None
    sha256: str = Field(description="sha256 of the uploaded file.")
    format: str
    size_bytes: int
    rows: int
    feature_shape: list[int]
    classes: list[str]
    groups: dict[str, GroupSizes] = Field(description="Group names and sizes per attribute.")


class ArchitectureOut(BaseModel):
    name: str
    description: str
    json_schema: dict
    default_input_shape: list[int] | None = Field(
        description="Input shape of one example with the spec's defaults; null when the spec has required sizes."
    )
