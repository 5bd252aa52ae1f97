"""The report page: the sections of the typed report rendered through worker/templates/report.html."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pydantic import TypeAdapter

from worker.report_html.format import MISSING, count, fraction, number, points, ratio
from worker.report_html.index import ReportIndex
from worker.report_html.plots import Plots
from worker.report_html.prose import explanation, mitigation_sentences
from worker.report_html.tables import (
    aggregates_table,
    compression_table,
    diagnostics_table,
    group_table,
    mitigation_table,
    run_checks,
    verdict_table,
)

if TYPE_CHECKING:
    from service.schemas.reports import AuditReport

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# Times are shown as the JSON report writes them.
TIMESTAMP = TypeAdapter(datetime | None)
# Per attribute: (id suffix, title, caption, the Plots method that draws it), in page order.
ATTRIBUTE_FIGURES = [
    (
        "accuracy",
        "Accuracy of each group as sparsity grows",
        "One line per group; the dense model at ratio 0; dashed: overall accuracy.",
        Plots.accuracy_curves,
    ),
    (
        "excess-gap",
        "Excess accuracy gap ψ per group and ratio",
        "ψa = group's accuracy drop − overall drop, in points; above the dashed ε line the policy fails.",
        Plots.gap_bars,
    ),
    (
        "excessive-loss",
        "Excessive loss R(a) per group and ratio",
        "R(a) = pruned loss − dense loss of the group; red diamonds: the second-order prediction R̂(a).",
        Plots.loss_bars,
    ),
    (
        "gradient-vs-size",
        "Dense gradient norm vs group size",
        "Tran et al.: smaller groups tend to have larger gradient norms, and larger norms more harm.",
        Plots.gradient_vs_size,
    ),
    (
        "curvature-vs-boundary",
        "Curvature vs distance to the decision boundary",
        "Groups near the boundary (high p(1 − p)) tend to have a larger Hessian trace, and more harm.",
        Plots.curvature_vs_boundary,
    ),
    (
        "flips",
        "Prediction flips per group",
        (
            "Share of the group's examples the pruned model gets wrong that the dense one got right (up), "
            "and the reverse (down, hatched)."
        ),
        Plots.flip_bars,
    ),
    (
        "group-sizes",
        "Group sizes",
        "Orange: below the minimum group size (the policy ignores them).",
        Plots.group_sizes,
    ),
]


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fraction=fraction, points=points, ratio=ratio, number=number, count=count)
    return env


def _slug(text: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "attribute"


def _attribute_section(index: ReportIndex, plots: Plots, name: str) -> dict:
    """One attribute's figures and tables."""
    dense_attribute = index.attribute(index.dense, name)
    dense_aggregates = dense_attribute.aggregates if dense_attribute else None
    figures = [
        {
            "testid": f"plot-{key}",
            "title": title,
            "caption": caption,
            "svg": plots.render(build, name),
            "id": f"{_slug(name)}-{key}",
        }
        for key, title, caption, build in ATTRIBUTE_FIGURES
    ]
    return {
        "name": name,
        "slug": _slug(name),
        "figures": figures,
        "small_groups": dense_aggregates.small_groups if dense_aggregates else [],
        "min_group_size": count(
            index.policy.get("min_group_size", dense_aggregates.min_group_size if dense_aggregates else None)
        ),
        "n_missing": count(dense_attribute.n_missing if dense_attribute else None),
        "groups": group_table(index, name),
        "diagnostics": diagnostics_table(index, name),
        "aggregates": aggregates_table(index, name),
    }


def _mitigation_section(index: ReportIndex, plots: Plots) -> dict | None:
    """The 'mitigation before/after' section: per method and ratio, each mitigation next to 'none', on the
    evaluation and the train split, with the multipliers and the wall time; None when the audit has none."""
    if not index.mitigated_methods():
        return None
    attribute = next(r.mitigation_details.attribute for r in index.runs if r.mitigation_details)
    return {
        "attribute": attribute,
        "rows": mitigation_table(index, attribute),
        "sentences": mitigation_sentences(index, attribute),
        "svg": plots.render(Plots.mitigation_curves, attribute),
    }


def _notes(index: ReportIndex) -> list[str]:
    """Run notes, and why figures are undefined or rest on part of the data; each said once."""
    seen: dict[str, None] = {}
    for run in index.all_runs:
        for key, text in run.notes.items():
            seen.setdefault(f"{key}: {text}")
        for attribute in run.attributes:
            name = attribute.attribute
            for explained in (attribute.undefined, attribute.caveats):
                for key, text in explained.items():
                    seen.setdefault(f"{name}: {key}: {text}")
            for group in attribute.groups:
                for key, text in group.undefined.items():
                    seen.setdefault(f"{name} group '{group.group}': {key}: {text}")
    return list(seen)


def _changes_section(changes: dict | None) -> dict | None:
    """What moved since the schedule's previous audit (service/changes.py), in sentences."""
    if not changes:
        return None
    verdict = changes["verdict"]
    sentences = [
        f"The verdict changed: {'passes' if verdict['before'] else 'fails'} before, "
        f"{'passes' if verdict['now'] else 'fails'} now."
        if changes["verdict_changed"]
        else "The verdict is unchanged."
    ]
    for label, moved in changes["highest_passing_ratio_moved"].items():
        sentences.append(f"{label}: the highest passing sparsity moved from {moved['before']} to {moved['now']}.")
    for item in changes["worst_group_grew"]:
        sentences.append(
            f"{item['run']}, {item['attribute']}: {item['metric']} grew from {item['before']:.4f} to {item['now']:.4f}."
        )
    for item in changes["newly_small_groups"]:
        sentences.append(f"Group {item['group']} of {item['attribute']} is newly below the minimum group size.")
    return {"previous": changes["previous_audit_id"], "threshold": changes["threshold"], "sentences": sentences}


def render_report_html(report: AuditReport) -> str:
    """The report page: self-contained (inline CSS, plots as inline SVG, no script, nothing outside the page)."""
    index = ReportIndex(report)
    plots = Plots(index)
    compression_columns, compression_rows = compression_table(index)
    model, dataset = report.model, report.dataset
    context = {
        "audit_id": report.audit_id,
        "created_at": TIMESTAMP.dump_python(report.created_at, mode="json"),
        "finished_at": TIMESTAMP.dump_python(report.finished_at, mode="json"),
        "report_version": report.report_version,
        "model": model,
        "architecture": model.architecture.get("name") or MISSING,
        "parameter_count": count(model.parameter_count),
        "dataset": dataset,
        "rows": count(dataset.rows),
        "environment": [
            (str(k), str(v)) for k, v in report.environment.items() if not isinstance(v, (dict, list)) and v is not None
        ],
        "verdict": verdict_table(index),
        "changes": _changes_section(report.changes),
        "explanation": explanation(index),
        "attributes": [_attribute_section(index, plots, name) for name in index.attributes],
        "run_checks": run_checks(index),
        "compression_columns": compression_columns,
        "compression_rows": compression_rows,
        "mitigation": _mitigation_section(index, plots),
        "notes": _notes(index),
        "missing": MISSING,
        "json_url": f"/v1/audits/{report.audit_id}/report",
        "csv_url": f"/v1/audits/{report.audit_id}/report.csv",
    }
    return _environment().get_template("report.html").render(**context)
