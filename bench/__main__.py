"""`make bench`: one JSON object per line per figure; exits 0 even when a target is missed.

`python -m bench` runs every figure, each in its own subprocess (so each figure's peak RSS is its own);
`python -m bench NAME …` runs the named ones in this process; `--list` names them; `--smoke` runs at smoke
size (tiny, numbers meaningless: a check that the service figures run; the engine modules have no smoke size).

Durations measured on the 2-core machine (shared): engine … mitigation ≈ 11.5 min together, audit_tabular
2.3 min, service_overhead 1.7 min, scale_out 4 min, audit_resnet20 ≤ 20 min (it is cut at 16 min and reports
a lower bound while default diagnostics take hours on it); smoke size: ≈ 3 min for the four service figures."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from bench.common import SMOKE_ENV

# Figure name → module; a module may print several lines (engine, group_metrics, diagnostics, pruning, mitigation).
FIGURES = {
    "engine": "bench.engine",
    "group_metrics": "bench.group_metrics",
    "diagnostics": "bench.diagnostics",
    "pruning": "bench.pruning",
    "mitigation": "bench.mitigation",
    "audit_resnet20": "bench.audit_resnet20",
    "audit_tabular": "bench.audit_tabular",
    "service_overhead": "bench.service_overhead",
    "scale_out": "bench.scale_out",
    "curvature_accuracy": "bench.curvature_accuracy",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help="figures to run: " + ", ".join(FIGURES))
    parser.add_argument("--list", action="store_true", help="print the figures' names, one a line")
    parser.add_argument("--smoke", action="store_true", help=f"smoke size (sets {SMOKE_ENV}=1)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; one of: {', '.join(FIGURES)}")
    if args.list:
        print("\n".join(FIGURES))
        return 0
    if args.smoke:
        os.environ[SMOKE_ENV] = "1"
    if args.names:
        for name in args.names:
            importlib.import_module(FIGURES[name]).main()
        return 0
    for name in FIGURES:
        # Each figure alone in a fresh process; a figure that crashes is reported on stderr, the rest still run.
        done = subprocess.run([sys.executable, "-m", "bench", name])
        if done.returncode != 0:
            print(f"bench: figure {name} exited {done.returncode}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
