"""`audit_tabular`: one audit of an MLP (2 hidden layers of 256, 2 classes, seeded random initialisation)
through the HTTP API on the embedded stack with one real worker process, on a seeded synthetic table of
200,000 rows × 100 float features with two group attributes, `race` (5 groups, unequal shares) and `sex`
(2), so 5 + 2 + 10 (their intersection) = 17 groups are reported; sweep: ratios 0.5, 0.7, 0.9 ×
magnitude-global and channel-l1-layerwise, otherwise the default spec.

Value: audit wall time / the time to evaluate its 7 models once over the same rows (bench/reference.py, the
worker's environment and thread rule), as for audit_resnet20. Target ≤ 10. Details also give the same
audit at the Adult data set's size (15,060 rows × 103 features, the same MLP and 5 × 2 groups), run on the
same stack after it. Smoke size (BENCH_SMOKE=1): 5,000 and 2,000 rows, curvature off."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.audits import audit_against_reference
from bench.common import emit, smoke
from bench.stack import BenchStack

HIDDEN = [256, 256]
SIZES = {"large": (200_000, 100), "adult": (15_060, 103)}
SMOKE_SIZES = {"large": (5_000, 100), "adult": (2_000, 103)}
TARGET = 10.0
# Past these the audit is cancelled and the value is a lower bound (details.timed_out), so `make bench` ends.
TIMEOUT_S = {"large": 10 * 60, "adult": 5 * 60}
SMOKE_TIMEOUT_S = 5 * 60
RACE_SHARES = [0.62, 0.2, 0.1, 0.05, 0.03]  # unequal, as in census data

# What explains a miss (measured 2026-12-01: 12.0, 25.8 s against 2.15 s, phases in details).
WHY_MISSED = (
    "fixed costs around the 7 evaluation passes: the HTML report (matplotlib, ~4.5 s for 17 groups of 3 attributes) "
    "and the dense baseline's diagnostics (cProfile: Gauss–Newton per-example gradients 3–5 s, gradient norms 2 s, "
    "curvature 2 s); each run costs ~1 s"
)


def table(rows: int, features: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded synthetic rows: standard normal features, a noisy linear label, race (5) and sex (2)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    y = (x @ rng.standard_normal(features) + rng.standard_normal(rows) > 0).astype(np.int64)
    return {
        "x": x,
        "y": y,
        "group_race": rng.choice(5, size=rows, p=RACE_SHARES),
        "group_sex": rng.integers(0, 2, rows),
    }


def architecture(features: int) -> dict:
    return {"name": "mlp", "in_features": features, "hidden": HIDDEN, "num_classes": 2}


def main() -> None:
    sizes = SMOKE_SIZES if smoke() else SIZES
    measured = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench-tabular-"))
    try:
        with BenchStack() as stack:
            for name, (rows, features) in sizes.items():
                (workdir / name).mkdir()
                measured[name] = audit_against_reference(
                    stack,
                    architecture(features),
                    table(rows, features),
                    ["race", "sex"],
                    workdir / name,
                    timeout_s=SMOKE_TIMEOUT_S if smoke() else TIMEOUT_S[name],
                    reference_repeats=3,
                )
            peaks = stack.peaks_mb()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratio, details = measured["large"]
    adult_ratio, adult = measured["adult"]
    details |= peaks | {
        "meaning": "audit wall time via the API / one eval-mode pass of its 7 models over the same rows",
        "reference_is": "median of 3 repeats of the 7 passes",
        "adult_sized": {
            "ratio": round(adult_ratio, 3),
            "audit_s": adult["audit_s"],
            "reference_s": adult["reference_s"],
            "rows": adult["rows"],
            "x_shape": adult["x_shape"],
            "audit_status": adult["audit_status"],
            "phases": adult["phases"],
            "run_seconds": adult["run_seconds"],
        },
    }
    ok = details["audit_status"] == "succeeded" and ratio <= TARGET
    if not ok:
        details["why_missed"] = WHY_MISSED
    emit("audit_tabular", ratio, "ratio", f"<= {TARGET:g}", ok, details)
