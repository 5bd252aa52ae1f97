from __future__ import annotations

from pydantic import BaseModel, Field


class GroupFigures(BaseModel):
    accuracy: float
    accuracy_drop: float
    excess_accuracy_gap: float
    excessive_loss: float


class ComparedGroup(BaseModel):
    group: str
    n: int
    first: GroupFigures | None = Field(description="In the first audit; null if the group is not in it.")
    second: GroupFigures | None
    accuracy_difference: float | None = Field(description="second − first accuracy.")


class ComparedRun(BaseModel):
    label: str
    ratio: float
    attribute: str
    first_passed: bool | None
    second_passed: bool | None
    groups: list[ComparedGroup]


class Comparison(BaseModel):
    audits: tuple[str, str]
    dataset_sha256: str
    runs: list[ComparedRun] = Field(
        description="The dense baselines, then every (method, ratio, attribute) present in both audits."
    )
