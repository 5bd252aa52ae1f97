"""`make bench`: one JSON object per line per figure; exits 0 even when a target is missed."""

import importlib

for name in ("engine", "group_metrics", "diagnostics", "pruning"):
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.{name}":
            raise
        continue
    module.main()
