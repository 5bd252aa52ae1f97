"""`make bench`: one JSON object per line per figure; exits 0 even when a target is missed."""

from bench import diagnostics, engine, group_metrics, mitigation, pruning

for module in (engine, group_metrics, diagnostics, pruning, mitigation):
    module.main()
