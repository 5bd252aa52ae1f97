"""Two audits of the same dataset side by side per group: model v1 vs v2, or two pruning recipes."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.audits import assemble_report, succeeded_audit
from service.errors import InvalidInput
from service.schemas.compare import ComparedGroup, ComparedRun, Comparison, GroupFigures
from service.schemas.reports import AttributeReport, RunReport


def _figures(attribute: AttributeReport | None) -> dict[str, tuple[int, GroupFigures]]:
    if attribute is None:
        return {}
    return {
        g.group: (g.n, GroupFigures(**g.model_dump(include=set(GroupFigures.model_fields)))) for g in attribute.groups
    }


def _compare_runs(first: RunReport, second: RunReport) -> list[ComparedRun]:
    compared = []
    second_attributes = {a.attribute: a for a in second.attributes}
    for attribute in first.attributes:
        if attribute.attribute not in second_attributes:
            continue
        left, right = _figures(attribute), _figures(second_attributes[attribute.attribute])
        groups = []
        for group in dict.fromkeys([*left, *right]):
            a, b = left.get(group), right.get(group)
            groups.append(
                ComparedGroup(
                    group=group,
                    n=(a or right[group])[0],  # the group is a key of left or of right
                    first=a and a[1],
                    second=b and b[1],
                    accuracy_difference=b[1].accuracy - a[1].accuracy if a and b else None,
                )
            )
        compared.append(
            ComparedRun(
                label=first.label,
                ratio=first.ratio,
                attribute=attribute.attribute,
                first_passed=first.verdict.passed if first.verdict is not None else None,
                second_passed=second.verdict.passed if second.verdict is not None else None,
                groups=groups,
            )
        )
    return compared


def compare_audits(session: Session, tenant_id: str, first_id: str, second_id: str) -> Comparison:
    first, second = (
        assemble_report(succeeded_audit(session, tenant_id, audit_id)) for audit_id in (first_id, second_id)
    )
    if first.dataset.sha256 != second.dataset.sha256:
        raise InvalidInput(
            f"audits {first_id} and {second_id} evaluate different datasets "
            f"({first.dataset.sha256[:12]}… vs {second.dataset.sha256[:12]}…); compare audits of the same data"
        )
    runs = _compare_runs(first.dense, second.dense)
    second_runs = {(r.label, r.ratio): r for r in second.runs}
    for run in first.runs:
        if (run.label, run.ratio) in second_runs:
            runs.extend(_compare_runs(run, second_runs[(run.label, run.ratio)]))
    return Comparison(audits=(first_id, second_id), dataset_sha256=first.dataset.sha256, runs=runs)
