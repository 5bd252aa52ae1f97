"""Change detection between two audits of one schedule: what a team wants to hear about when a nightly audit of
the newest model differs from last night's. Pure Python over the two reports (no torch): the worker calls it while
it assembles a scheduled audit's report, so the JSON, the HTML and the webhooks carry the same `changes`."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from service.audits import assemble_report
from service.models import Audit, AuditStatus, Schedule
from service.schemas.reports import AuditReport, RunReport


def previous_audit(session: Session, audit: Audit) -> Audit | None:
    """The schedule's last succeeded audit before this one (by tick)."""
    if audit.schedule_id is None or audit.scheduled_for is None:
        return None
    return session.scalars(
        select(Audit)
        .where(
            Audit.schedule_id == audit.schedule_id,
            Audit.status == AuditStatus.succeeded,
            Audit.scheduled_for < audit.scheduled_for,
            Audit.id != audit.id,
        )
        .options(selectinload(Audit.runs))
        .order_by(Audit.scheduled_for.desc())
        .limit(1)
    ).first()


def worst(run: RunReport) -> dict[str, tuple[float | None, float | None]]:
    """Per attribute: (max ψ, max accuracy drop) over its groups."""
    return {
        attribute.attribute: (attribute.aggregates.max_excess_accuracy_gap, attribute.aggregates.max_accuracy_drop)
        for attribute in run.attributes
    }


def grown(before: RunReport, now: RunReport, threshold: float) -> list[dict]:
    """The worst group's ψ or accuracy drop that grew by more than `threshold`, per attribute."""
    found = []
    earlier = worst(before)
    for attribute, values in worst(now).items():
        for metric, previous, current in zip(
            ("max_excess_accuracy_gap", "max_accuracy_drop"), earlier.get(attribute, (None, None)), values, strict=True
        ):
            if previous is not None and current is not None and current - previous > threshold:
                found.append(
                    {
                        "run": f"{now.label}@{now.ratio:g}",
                        "attribute": attribute,
                        "metric": metric,
                        "before": previous,
                        "now": current,
                    }
                )
    return found


def compare_reports(before: AuditReport, now: AuditReport, threshold: float, previous_id: str) -> dict:
    moved = {
        label: {"before": before.verdict.highest_passing_ratio.get(label), "now": ratio}
        for label, ratio in now.verdict.highest_passing_ratio.items()
        if before.verdict.highest_passing_ratio.get(label) != ratio
    }
    earlier_runs = {(run.label, run.ratio): run for run in before.runs}
    growth = [
        item
        for run in now.runs
        if (run.label, run.ratio) in earlier_runs
        for item in grown(earlier_runs[(run.label, run.ratio)], run, threshold)
    ]
    small_before = {(a.attribute, g) for a in before.dense.attributes for g in a.aggregates.small_groups}
    newly_small = [
        {"attribute": a.attribute, "group": g}
        for a in now.dense.attributes
        for g in a.aggregates.small_groups
        if (a.attribute, g) not in small_before
    ]
    verdict_changed = before.verdict.passed != now.verdict.passed
    return {
        "previous_audit_id": previous_id,
        "verdict_changed": verdict_changed,
        "verdict": {"before": before.verdict.passed, "now": now.verdict.passed},
        "highest_passing_ratio_moved": moved,
        "worst_group_grew": growth,
        "newly_small_groups": newly_small,
        "threshold": threshold,
        "any": bool(verdict_changed or moved or growth or newly_small),
    }


def detect_changes(session: Session, audit: Audit) -> dict | None:
    """The changes since the schedule's previous succeeded audit; None for an unscheduled or a first audit. The
    caller has stored every run of `audit`."""
    previous = previous_audit(session, audit)
    if previous is None:
        return None
    schedule = session.get(Schedule, audit.schedule_id)
    threshold = schedule.change_threshold if schedule is not None else 0.02
    return compare_reports(assemble_report(previous), assemble_report(audit), threshold, previous.id)
