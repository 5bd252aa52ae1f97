"""How every number on the page is written. Each one is a report value passed through one of these formatters;
nothing shown is recomputed from other numbers, so the page cannot disagree with the JSON or the CSV:

    fraction   accuracy, share, achieved sparsity, flip rates    f"{v * 100:.1f}%"        0.9444 → "94.4%"
    points     Δa, ψ, overall drop, fairness violations,         f"{v * 100:.1f}"         0.0525 → "5.2"
               policy values and thresholds (percentage points)
    ratio      the requested pruning ratio                       f"{v * 100:g}%"          0.9 → "90%"
    number     losses, R(a), R̂(a), gradient norms, curvature,    f"{v:.4g}"               0.012345 → "0.01235"
               boundary proximity, logit margin
    rho        Spearman ρ                                        f"{v:+.2f}"              -0.5 → "-0.50"
    count      n, flips, parameters, MACs, bytes                 f"{v:,}"                 12345 → "12,345"
    times      compression ratios (dense / pruned)               f"{v:.2f}×"
    ms         latency (seconds in the report)                   f"{v * 1000:.3g} ms"
    interval   a CI [lo, hi]                                     f"[{f(lo)}, {f(hi)}]", f the field's format

"-0.0" and "-0.0%" are shown without the sign. null is shown as "—".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

MISSING = "—"


def finite(value: Any) -> TypeGuard[float]:
    """A number that can be drawn or ranked: not None, not a bool, not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unsigned_zero(text: str) -> str:
    return text[1:] if re.fullmatch(r"-0(\.0*)?%?", text) else text


def _formatter(spec: Callable[[Any], str]) -> Callable[[Any], str]:
    def format_value(value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return MISSING
        return _unsigned_zero(spec(value))

    return format_value


fraction = _formatter(lambda v: f"{v * 100:.1f}%")
points = _formatter(lambda v: f"{v * 100:.1f}")
ratio = _formatter(lambda v: f"{v * 100:g}%")
number = _formatter(lambda v: f"{v:.4g}")
rho = _formatter(lambda v: f"{v:+.2f}")
count = _formatter(lambda v: f"{int(v):,}")
times = _formatter(lambda v: f"{v:.2f}×")
ms = _formatter(lambda v: f"{v * 1000:.3g} ms")


def interval(value: Sequence[Any] | None, fmt: Callable[[Any], str]) -> str:
    if not value or len(value) != 2 or any(v is None for v in value):
        return MISSING
    return f"[{fmt(value[0])}, {fmt(value[1])}]"


def mathtext_escaped(text: Any) -> str:
    """Group names are data: keep matplotlib's mathtext from reading '$' in them."""
    return str(text).replace("$", r"\$")
