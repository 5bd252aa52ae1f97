"""The page's sentences: the plain-language explanation of the worst run, the Spearman correlations in words,
and each mitigation against its baseline. Every number in them is a report value, formatted."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.report_html.format import count, finite, fraction, number, points, ratio, rho
from worker.report_html.index import ReportIndex, mitigation_label, verdict_passed

if TYPE_CHECKING:
    from results.attributes import MechanismDiagnostics
    from results.groups import GroupResult
    from service.schemas.reports import AttributeReport, RunReport


def _rank(values: dict[str, Any], group: str) -> tuple[int, int] | None:
    """(rank of the group's value, 1 = largest; number of groups with a value), or None without one."""
    known = {g: v for g, v in values.items() if finite(v)}
    if group not in known:
        return None
    return 1 + sum(1 for v in known.values() if v > known[group]), len(known)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _rank_words(what: str, value: Any, rank: tuple[int, int] | None, fmt: Callable[[Any], str]) -> str:
    if rank is None:
        return f"its {what} was not computed"
    position, total = rank
    if position == 1:
        return f"its {what} ({fmt(value)}) is the largest of all {total} groups, which the paper ties to this harm"
    if position <= math.ceil(total / 4):
        return (
            f"its {what} ({fmt(value)}) is the {_ordinal(position)} largest of {total} groups, in the top "
            "quartile, which the paper ties to this harm"
        )
    return (
        f"its {what} ({fmt(value)}) is only the {_ordinal(position)} largest of {total} groups, so it does not "
        "single this group out"
    )


SPEARMAN = {
    # field of MechanismDiagnostics: (expected sign, sentence when ρ has the expected sign, sentence otherwise)
    "size_vs_dense_gradient_norm": (
        -1,
        "smaller groups have larger dense gradient norms, as Tran et al.'s Proposition 1 expects",
        "group size and dense gradient norm do not fall together here, unlike Tran et al.'s Proposition 1",
    ),
    "dense_gradient_norm_vs_dense_hessian_trace": (
        1,
        "groups with larger gradient norms also have more curvature, as in the paper's Figure 6",
        "gradient norm and curvature do not rise together here, unlike the paper's Figure 6",
    ),
    "dense_accuracy_vs_accuracy_drop": (
        -1,
        "groups the dense model classified worse lose more accuracy",
        "the groups that lose the most are not those the dense model classified worst",
    ),
    "predicted_vs_excessive_loss": (
        1,
        "the second-order prediction R̂(a) ranks the groups' excessive loss R(a) in the right order",
        "the second-order prediction R̂(a) does not rank the groups' excessive loss R(a) in the right order",
    ),
}


def _strength(value: float) -> str:
    size = abs(value)
    return "strong" if size >= 0.7 else "moderate" if size >= 0.4 else "weak"


def spearman_sentences(diagnostics: MechanismDiagnostics, groups: int) -> list[str]:
    sentences = [f"Over the {groups} groups of this run:"]
    for key, (sign, agrees, disagrees) in SPEARMAN.items():
        correlation = getattr(diagnostics, key)
        value = correlation.rho
        if not finite(value):
            reason = correlation.reason or "not computed"
            sentences.append(f"the rank correlation of {key.replace('_', ' ')} is not available ({reason});")
            continue
        words = agrees if value * sign > 0 else disagrees
        sentences.append(f"{words} (Spearman ρ = {rho(value)}, {_strength(value)});")
    sentences[-1] = sentences[-1][:-1] + "."
    return sentences


def _largest_gap(run: RunReport) -> tuple[float, AttributeReport | None]:
    """The run's largest max ψ over its attributes, and that attribute (None where no ψ is defined)."""
    best: tuple[float, AttributeReport | None] = (-math.inf, None)
    for attribute in run.attributes:
        value = attribute.aggregates.max_excess_accuracy_gap
        if finite(value) and value > best[0]:
            best = (value, attribute)
    return best


def focus_run(index: ReportIndex) -> tuple[RunReport, AttributeReport] | None:
    """The run to explain, and its attribute: the largest max ψ among runs that fail the policy, else among the
    runs at the highest ratio; within the run, the attribute with the largest max ψ."""
    failing = [r for r in index.runs if verdict_passed(r) is False]
    if failing:
        candidates = failing
    else:
        top = max((r.ratio for r in index.runs), default=None)
        candidates = [r for r in index.runs if r.ratio == top]
    ranked: list[tuple[float, RunReport, AttributeReport]] = []
    for candidate in candidates:
        gap, attribute = _largest_gap(candidate)
        if attribute is not None:
            ranked.append((gap, candidate, attribute))
    if not ranked:
        return None
    _, run, attribute = max(ranked, key=lambda item: item[0])
    return run, attribute


def _harm_sentence(run: RunReport, name: str, worst: GroupResult, groups: int) -> str:
    drop = worst.accuracy_drop
    verb = "loses" if not finite(drop) or drop >= 0 else "gains"
    return (
        f"At {ratio(run.ratio)} sparsity ({run.label}) the {name} group '{worst.group}' {verb} "
        f"{points(abs(drop) if finite(drop) else None)} points of accuracy ({fraction(worst.dense_accuracy)} → "
        f"{fraction(worst.accuracy)}) against {points(run.overall.accuracy_drop)} overall: its "
        f"excess accuracy gap ψ = {points(worst.excess_accuracy_gap)} points is the largest of the "
        f"{groups} groups."
    )


def explanation(index: ReportIndex) -> list[str]:
    """The plain-language summary as paragraphs (what happens, then the mechanism), every number formatted
    from the report."""
    found = focus_run(index)
    if found is None:
        return ["No run has an excess accuracy gap to explain (no pruned run, or the gaps are undefined)."]
    run, attribute = found
    rows = [g for g in attribute.groups if finite(g.excess_accuracy_gap)]
    worst = max(rows, key=lambda g: g.excess_accuracy_gap)
    name = attribute.attribute
    sentences = [_harm_sentence(run, name, worst, len(rows))]
    if worst.small_group:
        sentences.append(
            f"It has only {count(worst.n)} examples, below the minimum group size, so treat its numbers with caution."
        )
    groups = [g.group for g in attribute.groups]
    gradient = {g: index.dense_figure(name, g, lambda row: row.diagnostics.dense_gradient_norm) for g in groups}
    curvature = {g: index.dense_figure(name, g, lambda row: row.diagnostics.dense_hessian_trace) for g in groups}
    g = worst.group
    first = _rank_words("dense gradient norm", gradient.get(g), _rank(gradient, g), number)
    second = _rank_words("dense Hessian trace", curvature.get(g), _rank(curvature, g), number)
    sentences.append(f"{first[0].upper()}{first[1:]}; {second}.")
    if run.verdict is not None:
        if run.verdict.passed:
            sentences.append("This run passes the policy.")
        else:
            reasons = "; ".join(run.verdict.reasons) or "see the checks below"
            sentences.append(f"This run fails the policy: {reasons}.")
    return [" ".join(sentences), " ".join(spearman_sentences(attribute.diagnostics, len(groups)))]


def mitigation_sentences(index: ReportIndex, attribute: str) -> list[str]:
    """Each constrained mitigation against plain fine-tuning at the highest ratio, on both splits, in words."""
    sentences = []
    for method in index.mitigated_methods():
        runs = [r for r in index.runs if index.pruning_label(r) == method]
        top = max(r.ratio for r in runs)
        at_top = {mitigation_label(r): r for r in runs if r.ratio == top}
        reference = "finetune" if "finetune" in at_top else "none"
        for name, run in at_top.items():
            if name in ("none", reference):
                continue
            figures = [
                (split, index.max_gap(at_top[reference], attribute, split), index.max_gap(run, attribute, split))
                for split in ("train", "eval")
            ]
            if not all(finite(before) and finite(after) for _, before, after in figures):
                continue
            words = [
                f"on the {'train' if split == 'train' else 'evaluation'} split from {points(before)} to "
                f"{points(after)} points"
                for split, before, after in figures
            ]
            sentences.append(
                f"At {ratio(top)} sparsity ({method}), {name} moves the largest excess accuracy gap "
                f"against {'plain fine-tuning' if reference == 'finetune' else 'no mitigation'} "
                f"{words[0]} and {words[1]}."
            )
    sentences.append(
        "The evaluation split is what a deployed model meets: Balancing Act reports that every method "
        "it tried, its own included, often fails to carry gains on the train split over to unseen data."
    )
    return sentences
