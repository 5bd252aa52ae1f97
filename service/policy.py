"""The release verdict: a policy's thresholds applied to a report's per-group numbers. Pure Python over
the report, so the JSON, the CSV, the HTML and `pruneaudit gate` give the same answer."""

from __future__ import annotations

from service.schemas.audits import PolicySpec
from service.schemas.reports import (
    AttributeReport,
    AuditVerdict,
    MetricItem,
    PolicyCheck,
    RunReport,
    RunVerdict,
)

CHECKS = {
    "max_excess_accuracy_gap": ("excess accuracy gap ψ", lambda groups: max(g.excess_accuracy_gap for g in groups)),
    "max_worst_group_drop": ("accuracy drop", lambda groups: max(g.accuracy_drop for g in groups)),
    "max_accuracy_fairness_violation": (
        "accuracy fairness violation",
        lambda groups: max(g.accuracy for g in groups) - min(g.accuracy for g in groups),
    ),
}


def attribute_checks(attribute: AttributeReport, policy: PolicySpec) -> list[PolicyCheck]:
    eligible = [g for g in attribute.groups if g.n >= policy.min_group_size]
    checks = []
    for name, (_words, measure) in CHECKS.items():
        threshold = getattr(policy, name)
        if threshold is None:
            continue
        value = measure(eligible) if eligible else None
        checks.append(
            PolicyCheck(
                name=name,
                attribute=attribute.attribute,
                value=value,
                threshold=threshold,
                passed=value is not None and value <= threshold,
            )
        )
    return checks


def reason(check: PolicyCheck, run: RunReport, policy: PolicySpec) -> str:
    words = CHECKS[check.name][0]
    if check.value is None:
        return (
            f"{check.attribute}: no group has at least {policy.min_group_size} examples, so no verdict is "
            "possible (lower policy.min_group_size or add data)"
        )
    attribute = next(a for a in run.attributes if a.attribute == check.attribute)
    eligible = [g for g in attribute.groups if g.n >= policy.min_group_size]
    if check.name == "max_accuracy_fairness_violation":
        where = ""
    else:
        field = "excess_accuracy_gap" if check.name == "max_excess_accuracy_gap" else "accuracy_drop"
        worst = max(eligible, key=lambda g: getattr(g, field))
        where = f" (group '{worst.group}')"
    return (
        f"{check.attribute}: {words} {check.value * 100:.1f} points{where} exceeds the limit of "
        f"{check.threshold * 100:.1f} points"
    )


def run_verdict(run: RunReport, policy: PolicySpec) -> RunVerdict:
    checks = [check for attribute in run.attributes for check in attribute_checks(attribute, policy)]
    reasons = [reason(check, run, policy) for check in checks if not check.passed]
    return RunVerdict(passed=not reasons, reasons=reasons, checks=checks)


def metric_items(attribute: AttributeReport, checks: list[PolicyCheck]) -> list[MetricItem]:
    """The attribute's headline metrics, each with its value, interval, n and (where the policy has one)
    threshold and outcome; a checked metric's value is the one the policy judged."""
    n = sum(g.n for g in attribute.groups)
    aggregates = attribute.aggregates
    by_name = {check.name: check for check in checks if check.attribute == attribute.attribute}
    items = []
    for name, value, ci in (
        ("max_excess_accuracy_gap", aggregates.max_excess_accuracy_gap, aggregates.max_excess_accuracy_gap_ci),
        ("max_worst_group_drop", aggregates.max_accuracy_drop, None),
        ("max_accuracy_fairness_violation", aggregates.accuracy_fairness_violation, None),
        ("loss_fairness_violation", aggregates.loss_fairness_violation, None),
    ):
        check = by_name.get(name)
        if check is None:
            items.append(MetricItem(name=name, value=value, ci=ci, n=n))
        else:
            items.append(
                MetricItem(
                    name=name,
                    value=check.value,
                    ci=ci if check.value == value else None,
                    n=n,
                    threshold=check.threshold,
                    passed=check.passed,
                )
            )
    return items


def audit_verdict(runs: list[RunReport]) -> AuditVerdict:
    """Over the pruned runs, each with its verdict already applied (assemble_report does that first)."""
    highest: dict[str, float | None] = {}
    for run in sorted(runs, key=lambda r: r.ratio):
        assert run.verdict is not None, f"run {run.label} at {run.ratio} has no verdict; only the dense run lacks one"
        if run.label not in highest:
            highest[run.label] = None
        # Monotone: a ratio counts only when every lower ratio of the same method passed too.
        if run.verdict.passed and highest[run.label] == _previous_ratio(runs, run):
            highest[run.label] = run.ratio
    passing = {label: ratio for label, ratio in highest.items() if ratio is not None}
    if passing:
        best = max(passing, key=passing.__getitem__)
        summary = f"passes: {best} holds the policy up to {passing[best]:.0%} sparsity" + "".join(
            f"; {label} up to {ratio:.0%}" for label, ratio in passing.items() if label != best
        )
    else:
        summary = "fails: no method meets the policy even at its lowest pruning ratio"
    return AuditVerdict(passed=bool(passing), highest_passing_ratio=highest, summary=summary)


def _previous_ratio(runs: list[RunReport], run: RunReport) -> float | None:
    lower = [r.ratio for r in runs if r.label == run.label and r.ratio < run.ratio]
    return max(lower) if lower else None
