"""Groups of examples: one attribute's integer codes (−1 = no group) checked against its names, the
intersection of several attributes, per-group means and counts by bincount over the groups that have examples,
and the spread over groups. No Python loop over examples. Definitions: docs/METHODS.md §1, §4."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker.engine.errors import EngineError


def checked_codes(attribute: str, codes: np.ndarray, n: int, n_names: int) -> np.ndarray:
    """`codes` as int64 after checking they are one integer per example (n), each in [−1, n_names)."""
    codes = np.asarray(codes)
    if codes.shape != (n,) or not np.issubdtype(codes.dtype, np.integer):
        raise EngineError(f"group codes for {attribute} must be {n} integers, got shape {codes.shape} of {codes.dtype}")
    if n and (codes.min() < -1 or codes.max() >= n_names):
        raise EngineError(f"group codes for {attribute} must be in [-1, {n_names}), got {codes.min()} to {codes.max()}")
    return codes.astype(np.int64, copy=False)


def intersect(columns: Sequence[tuple[str, np.ndarray, Sequence[str]]]) -> tuple[str, np.ndarray, list[str]]:
    """Intersectional groups of several attributes: ("race", codes, names), ("sex", ...) → ("race&sex",
    codes, ["Black&F", ...]). A row missing any attribute (code −1) is missing in the intersection; only
    combinations that occur get a code, in sorted order of the attributes' codes (the first attribute
    varies slowest), so the result does not depend on row order."""
    if not columns:
        raise EngineError("intersect needs at least one attribute")
    n = len(columns[0][1])
    checked = [(name, checked_codes(name, codes, n, len(names)), list(names)) for name, codes, names in columns]
    sizes = [max(len(names), 1) for _, _, names in checked]
    missing = np.zeros(n, dtype=bool)
    for _, codes, _ in checked:
        missing |= codes < 0
    cells = 1
    for size in sizes:
        cells *= size
    if cells < 2**62:
        # Mixed-radix key: its numeric order is the lexicographic order of the attribute codes.
        key = np.zeros(n, dtype=np.int64)
        for (_, codes, _), size in zip(checked, sizes, strict=True):
            key = key * size + np.maximum(codes, 0)
        valid_key = key[~missing]
        if cells <= max(4 * n, 1 << 20):
            seen = np.bincount(valid_key, minlength=cells) > 0
            combos = np.flatnonzero(seen)
            new_code = np.cumsum(seen) - 1
            inverse = new_code[valid_key]
        else:
            combos, inverse = np.unique(valid_key, return_inverse=True)
        digits = []
        rest = combos
        for size in reversed(sizes):
            digits.append(rest % size)
            rest = rest // size
        combo_codes = np.stack(digits[::-1], axis=1) if len(combos) else np.empty((0, len(sizes)), np.int64)
    else:  # too many combinations for one int64 key: unique rows (slower, same order)
        stacked = np.stack([codes for _, codes, _ in checked], axis=1)[~missing]
        combo_codes, inverse = np.unique(stacked, axis=0, return_inverse=True)
    out = np.full(n, -1, dtype=np.int64)
    out[~missing] = np.asarray(inverse).reshape(-1)
    names = ["&".join(checked[k][2][int(c)] for k, c in enumerate(row)) for row in combo_codes]
    return "&".join(name for name, _, _ in checked), out, names


class Grouping:
    """Group sums and counts of per-example values by bincount, over the groups that have examples."""

    def __init__(self, codes: np.ndarray, n_names: int) -> None:
        self.codes = codes
        self.has_group = codes >= 0
        self.all_grouped = bool(self.has_group.all())
        self.group_codes = codes if self.all_grouped else codes[self.has_group]
        self.n_names = n_names
        counts = np.bincount(self.group_codes, minlength=n_names)
        self.present = np.flatnonzero(counts)
        self.sizes = counts[self.present]
        self.n_missing = len(codes) - len(self.group_codes)

    def _grouped(self, values: np.ndarray) -> np.ndarray:
        return values if self.all_grouped else values[self.has_group]

    def mean(self, values: np.ndarray) -> np.ndarray:
        weights = self._grouped(values)
        weights = weights if weights.dtype == np.float64 else weights.astype(np.float64)
        return np.bincount(self.group_codes, weights=weights, minlength=self.n_names)[self.present] / self.sizes

    def count(self, flags: np.ndarray) -> np.ndarray:
        return np.bincount(self.group_codes[self._grouped(flags)], minlength=self.n_names)[self.present]

    def present_codes(self) -> np.ndarray:
        """Codes renumbered 0..len(present)−1 over the groups with examples; −1 stays −1."""
        index = np.zeros(self.n_names, dtype=np.int64)
        index[self.present] = np.arange(len(self.present))
        out = np.full(len(self.codes), -1, dtype=np.int64)
        out[self.has_group] = index[self.group_codes]
        return out


def spread(values: np.ndarray) -> float:
    """max − min over groups."""
    return float(values.max() - values.min())


def too_few_groups(attribute: str, group_names: list[str], required: int) -> str:
    """The reason a figure over groups is None: fewer than `required` groups have examples."""
    if not group_names:
        return f"no evaluated example has a group for attribute {attribute}"
    return f"needs at least {required} groups; attribute {attribute} has only {', '.join(group_names)}"
