from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["http://127.0.0.1:8000/problems/invalid-input"])
    title: str = Field(examples=["Invalid input"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["model expects input [64]; dataset x has [30]"])
    instance: str | None = None
    errors: list[dict] = Field(default_factory=list)


# Their content (problem+json with the Problem schema) is set for every error response by service/openapi.py.
PROBLEM_RESPONSES: dict[int | str, dict] = {
    code: {"model": Problem, "description": description}
    for code, description in {
        400: "Malformed request body",
        401: "Missing, unknown or revoked API key (X-API-Key)",
        404: "Not found",
        409: "Conflict",
        413: "Payload too large",
        422: "Invalid input",
    }.items()
}
