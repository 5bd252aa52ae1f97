"""The page's table rows: every cell is (report field, formatted value), so the template writes the field into
data-field and the value into the cell."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.report_html.format import (
    MISSING,
    count,
    fraction,
    interval,
    mathtext_escaped,
    ms,
    number,
    points,
    ratio,
    times,
)
from worker.report_html.index import ReportIndex, mitigation_label, verdict_passed

if TYPE_CHECKING:
    from results.attributes import AttributeAggregates
    from results.groups import GroupResult
    from service.schemas.reports import RunReport

Cells = list[tuple[str, str]]


def _group_cells(g: GroupResult) -> Cells:
    ci = g.confidence_intervals
    return [
        ("n", count(g.n)),
        ("share", fraction(g.share)),
        ("dense_accuracy", fraction(g.dense_accuracy)),
        ("accuracy", fraction(g.accuracy)),
        ("accuracy_ci", interval(ci.accuracy_ci, fraction)),
        ("accuracy_drop", points(g.accuracy_drop)),
        ("excess_accuracy_gap", points(g.excess_accuracy_gap)),
        ("excess_accuracy_gap_ci", interval(ci.excess_accuracy_gap_ci, points)),
        ("excessive_loss", number(g.excessive_loss)),
        ("predicted_excessive_loss", number(g.diagnostics.predicted_excessive_loss)),
        ("flips_correct_to_wrong", count(g.flips.flips_correct_to_wrong)),
        ("flips_wrong_to_correct", count(g.flips.flips_wrong_to_correct)),
    ]


def group_table(index: ReportIndex, name: str) -> list[dict]:
    """Per-group rows of every pruned run for one attribute, one block per run."""
    blocks = []
    for run in index.ordered_runs():
        attribute = index.attribute(run, name)
        if attribute is None:
            continue
        rows = [{"group": g.group, "small": g.small_group, "cells": _group_cells(g)} for g in attribute.groups]
        blocks.append({"run": run, "ratio": ratio(run.ratio), "rows": rows, "passed": verdict_passed(run)})
    return blocks


# The dense model's figures of a group in the diagnostics table, each read from its row in the first run that has it.
DENSE_FIGURES: list[tuple[str, Callable[[GroupResult], Any]]] = [
    ("dense_gradient_norm", lambda row: row.diagnostics.dense_gradient_norm),
    ("dense_hessian_trace", lambda row: row.diagnostics.dense_hessian_trace),
    ("dense_hessian_top_eigenvalue", lambda row: row.diagnostics.dense_hessian_top_eigenvalue),
    ("dense_boundary_proximity", lambda row: row.boundary.dense_boundary_proximity),
    ("dense_logit_margin", lambda row: row.boundary.dense_logit_margin),
]


def diagnostics_table(index: ReportIndex, name: str) -> list[dict]:
    """The dense model's per-group diagnostics: why pruning hurts which group."""
    rows = []
    for group in index.groups(name):
        row = index.dense_row(name, group)
        rows.append(
            {
                "group": group,
                "small": row.small_group,
                "cells": [
                    ("n", count(row.n)),
                    ("share", fraction(row.share)),
                    ("dense_accuracy", fraction(row.dense_accuracy)),
                    *((field, number(index.dense_figure(name, group, read))) for field, read in DENSE_FIGURES),
                ],
            }
        )
    return rows


# Cells of the aggregates table read from AttributeAggregates, each the field of the same name.
AGGREGATE_CELLS: list[tuple[str, Callable[[Any], str]]] = [
    ("max_excess_accuracy_gap", points),
    ("pairwise_disparity", points),
    ("max_accuracy_drop", points),
    ("accuracy_fairness_violation", points),
    ("loss_fairness_violation", number),
    ("worst_group", lambda v: MISSING if v is None else str(v)),
    ("worst_group_accuracy", fraction),
]


def _aggregate_cells(aggregates: AttributeAggregates | None) -> Cells:
    return [(field, fmt(None if aggregates is None else getattr(aggregates, field))) for field, fmt in AGGREGATE_CELLS]


def aggregates_table(index: ReportIndex, name: str) -> list[dict]:
    """One row per run, the dense baseline first: the run's overall figures and the attribute's aggregates."""
    rows = []
    for run in [index.dense, *index.ordered_runs()]:
        attribute = index.attribute(run, name)
        rows.append(
            {
                "run": run,
                "passed": verdict_passed(run),
                "cells": [
                    ("ratio", ratio(run.ratio)),
                    ("achieved_sparsity", fraction(run.achieved_sparsity)),
                    ("overall_accuracy", fraction(run.overall.accuracy)),
                    ("overall_accuracy_drop", points(run.overall.accuracy_drop)),
                    *_aggregate_cells(None if attribute is None else attribute.aggregates),
                ],
            }
        )
    return rows


COMPRESSION_FIELDS = [
    ("parameters", count),
    ("nonzero_parameters", count),
    ("macs", count),
    ("file_bytes", count),
    ("latency_s_batch_1", ms),
    ("latency_s_batch_64", ms),
]


def _cost(run: RunReport, side: str) -> dict:
    """The run's 'dense' or 'pruned' model cost, or its 'ratios' (run.compression is a plain mapping)."""
    return run.compression.get(side) or {}


def compression_table(index: ReportIndex) -> tuple[list[tuple[str, str]], list[dict]]:
    """The columns (only the figures some run has) and one row per run: the pruned cost with dense / pruned."""
    present = [
        (key, fmt)
        for key, fmt in COMPRESSION_FIELDS
        if any(_cost(r, side).get(key) is not None for r in index.all_runs for side in ("dense", "pruned"))
    ]
    rows = []
    dense_cost = _cost(index.dense, "dense")
    if dense_cost:
        rows.append({"run": index.dense, "cells": [(key, fmt(dense_cost.get(key)), MISSING) for key, fmt in present]})
    for run in index.ordered_runs():
        pruned, ratios = _cost(run, "pruned"), _cost(run, "ratios")
        rows.append(
            {"run": run, "cells": [(key, fmt(pruned.get(key)), times(ratios.get(key))) for key, fmt in present]}
        )
    return [(key, key.replace("_", " ").replace("latency s", "latency")) for key, _ in present], rows


def _policy_thresholds(policy: dict) -> list[tuple[str, str, str, str]]:
    """(policy key, words, value, unit) per threshold; a threshold the policy leaves out is 'not checked'."""
    thresholds = [
        (
            "max_excess_accuracy_gap",
            "max excess accuracy gap ψ (ε)",
            points(policy.get("max_excess_accuracy_gap")),
            " points",
        ),
        (
            "max_worst_group_drop",
            "max accuracy drop of any group",
            points(policy.get("max_worst_group_drop")),
            " points",
        ),
        (
            "max_accuracy_fairness_violation",
            "max accuracy fairness violation",
            points(policy.get("max_accuracy_fairness_violation")),
            " points",
        ),
        ("min_group_size", "minimum group size for a verdict", count(policy.get("min_group_size")), " examples"),
    ]
    return [
        (key, words, value, unit if value != MISSING else " (not checked)") for key, words, value, unit in thresholds
    ]


def verdict_table(index: ReportIndex) -> dict:
    """The audit's verdict: per method the highest passing ratio and why the first failing ratio fails."""
    verdict = index.report.verdict
    highest = verdict.highest_passing_ratio
    methods = []
    for method in index.labels or list(highest):
        runs = index.runs_by_label.get(method, [])
        first_failing = next((r for r in runs if verdict_passed(r) is False), None)
        failing_verdict = first_failing.verdict if first_failing else None
        methods.append(
            {
                "label": method,
                "highest": ratio(highest.get(method)),
                "none_passes": method in highest and highest.get(method) is None,
                "first_failing": ratio(first_failing.ratio) if first_failing else MISSING,
                "reasons": failing_verdict.reasons if failing_verdict else [],
            }
        )
    return {
        "passed": verdict.passed,
        "summary": verdict.summary,
        "methods": methods,
        "thresholds": _policy_thresholds(index.policy),
    }


def run_checks(index: ReportIndex) -> list[dict]:
    """Each pruned run's policy checks."""
    rows = []
    for run in index.ordered_runs():
        verdict = run.verdict
        checks = (
            [
                {
                    "name": c.name,
                    "attribute": c.attribute,
                    "value": points(c.value),
                    "threshold": points(c.threshold),
                    "passed": c.passed,
                }
                for c in verdict.checks
            ]
            if verdict
            else []
        )
        rows.append(
            {
                "run": run,
                "ratio": ratio(run.ratio),
                "passed": verdict_passed(run),
                "reasons": verdict.reasons if verdict else [],
                "checks": checks,
            }
        )
    return rows


def _largest_multiplier(run: RunReport) -> str:
    multipliers = (run.mitigation_details.multipliers if run.mitigation_details else None) or {}
    largest = max(multipliers, key=multipliers.__getitem__) if multipliers else None
    return f"{mathtext_escaped(largest)}: {number(multipliers[largest])}" if largest else MISSING


def mitigation_table(index: ReportIndex, attribute: str) -> list[dict]:
    """Per pruning method and ratio, each mitigation next to 'none', on the evaluation and the train split."""
    order = index.mitigation_labels()
    rows = []
    for method in index.mitigated_methods():
        runs = [r for r in index.runs if index.pruning_label(r) == method]
        for run in sorted(runs, key=lambda r: (r.ratio, order.index(mitigation_label(r)))):
            on_eval = index.split_aggregates(run, attribute, "eval")
            on_train = index.split_aggregates(run, attribute, "train")
            rows.append(
                {
                    "run": run,
                    "base": method,
                    "mitigation": mitigation_label(run),
                    "ratio": ratio(run.ratio),
                    "cells": [
                        ("accuracy", fraction(run.overall.accuracy)),
                        ("train_accuracy", fraction(run.train.overall.accuracy if run.train else None)),
                        ("max_excess_accuracy_gap", points(on_eval.max_excess_accuracy_gap if on_eval else None)),
                        (
                            "train_max_excess_accuracy_gap",
                            points(on_train.max_excess_accuracy_gap if on_train else None),
                        ),
                        ("max_accuracy_drop", points(on_eval.max_accuracy_drop if on_eval else None)),
                        ("loss_fairness_violation", number(on_eval.loss_fairness_violation if on_eval else None)),
                    ],
                    "largest_multiplier": _largest_multiplier(run),
                    "seconds": number(run.mitigation_details.seconds if run.mitigation_details else None),
                    "passed": verdict_passed(run),
                }
            )
    return rows
