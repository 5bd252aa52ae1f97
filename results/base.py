from __future__ import annotations

from pydantic import BaseModel, ConfigDict

Interval = tuple[float, float]


class Result(BaseModel):
    """Base of every result model: NaN and infinity are refused, so a stored result never holds them."""

    model_config = ConfigDict(allow_inf_nan=False)
