"""The per-group figures of one attribute while they are computed: one column (one value per group) per field
of the group results' sections, and the reason for every value left None."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from results.groups import BinaryRates, BoundaryProxies, ConfidenceIntervals, Confusion

# Keys of a group's `undefined` that stand for a whole section of fields left None for one reason.
GROUP_FIELD_FAMILIES: dict[str, tuple[str, ...]] = {
    family: tuple(section.model_fields)
    for family, section in (
        ("proxies", BoundaryProxies),
        ("confusion", Confusion),
        ("binary_rates", BinaryRates),
        ("confidence_intervals", ConfidenceIntervals),
    )
}


class GroupTable:
    """The section fields as columns (one value per group), and the reasons for the None ones."""

    def __init__(self, group_names: list[str]) -> None:
        self.group_names = group_names
        self.size = len(group_names)
        self.columns: dict[str, list] = {}
        self.undefined: list[dict[str, str]] = [{} for _ in group_names]

    def leave_out(self, family: str, reason: str) -> None:
        for field in GROUP_FIELD_FAMILIES[family]:
            self.columns[field] = [None] * self.size
        for reasons in self.undefined:
            reasons[family] = reason

    def section(self, i: int, section: type[BaseModel]) -> dict:
        """The values of one section's fields for group i (fields without a column keep their defaults)."""
        return {name: self.columns[name][i] for name in section.model_fields if name in self.columns}


def floats(values: np.ndarray) -> list[float | None]:
    """Python floats, None where NaN (an undefined rate; its reason is recorded by the caller)."""
    return [None if v != v else float(v) for v in values.tolist()]
