from __future__ import annotations

import re
from typing import Annotated

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Every id the service makes is service.models.new_id(): uuid4().hex. Checked by the schema, so nothing else (a NUL
# byte, which PostgreSQL text cannot hold, or any other junk) reaches SQL.
RESOURCE_ID_PATTERN = r"^[0-9a-f]{32}$"
ResourceId = Annotated[str, StringConstraints(pattern=RESOURCE_ID_PATTERN)]
PathId = Annotated[
    ResourceId,
    Path(description="An id the service made: 32 lowercase hex digits. Any other value answers 404, as a missing id."),
]


def is_resource_id(text: str) -> bool:
    return re.fullmatch(RESOURCE_ID_PATTERN, text) is not None


# Free text that is stored or compared in SQL: PostgreSQL text cannot hold NUL, so it is refused here (422).
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]


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
        404: "Not found (also an id in the path that is not one the service makes)",
        409: "Conflict",
        413: "Payload too large",
        422: "Invalid input",
    }.items()
}
