"""Where the page finds things in the report: pruned runs per label by ratio, the attributes and their groups in
order of appearance, the dense figures of each group, and the pruning method and mitigation of each run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from service.schemas.audits import MitigationSpec

if TYPE_CHECKING:
    from results.attributes import AttributeAggregates, AttributeMetrics
    from results.groups import GroupResult
    from service.schemas.reports import AttributeReport, AuditReport, RunReport

ReadRow = Callable[["GroupResult"], Any]


def verdict_passed(run: RunReport) -> bool | None:
    """Whether the run passes the policy; None for the dense baseline, which has no verdict."""
    return None if run.verdict is None else run.verdict.passed


def mitigation_label(run: RunReport) -> str:
    """The mitigation as the spec labels it ('ceag', 'equalized_loss-both'), 'none' for an unmitigated run:
    run.mitigation names the mitigation only, and an audit may run one mitigation at several placements."""
    if run.mitigation == "none":
        return "none"
    details = run.mitigation_details
    assert details is not None, "a mitigated run reports its mitigation_details"
    # model_construct takes the report's strings as they are (they were a validated MitigationSpec's).
    return MitigationSpec.model_construct(**details.model_dump(include={"name", "placement"})).label


class ReportIndex:
    """Lookups over one report. `labels` are the pruned runs' labels in order of appearance (a mitigated run's
    label names its mitigation too: 'magnitude-global+ceag'); `runs_by_label` holds each label's runs by ratio."""

    def __init__(self, report: AuditReport):
        self.report = report
        self.dense = report.dense
        self.runs = list(report.runs)
        self.policy = report.policy
        self.labels = list(dict.fromkeys(run.label for run in self.runs))
        self.runs_by_label = {
            label: sorted((r for r in self.runs if r.label == label), key=lambda r: r.ratio) for label in self.labels
        }
        self.attributes = list(dict.fromkeys(a.attribute for run in self.all_runs for a in run.attributes))
        # A mitigated run trains the unmitigated run listed before it (runs come per method and ratio: the
        # unmitigated run, then one run per mitigation), so it belongs to that run's pruning method.
        self._pruning_labels: dict[str, str] = {}
        for run in self.runs:
            if run.mitigation == "none":
                pruning_label = run.label
            self._pruning_labels[run.id] = pruning_label

    @property
    def all_runs(self) -> list[RunReport]:
        return [self.dense, *self.runs]

    def ordered_runs(self) -> list[RunReport]:
        """The pruned runs per label in order of appearance, each label's by ratio."""
        return [run for label in self.labels for run in self.runs_by_label[label]]

    def attribute(self, run: RunReport, name: str) -> AttributeReport | None:
        return next((a for a in run.attributes if a.attribute == name), None)

    def groups(self, name: str) -> list[str]:
        order: dict[str, None] = {}
        for run in self.all_runs:
            attribute = self.attribute(run, name)
            for row in attribute.groups if attribute else []:
                order.setdefault(row.group)
        return list(order)

    def row(self, run: RunReport, name: str, group: str) -> GroupResult | None:
        attribute = self.attribute(run, name)
        return next((g for g in attribute.groups if g.group == group), None) if attribute else None

    def value(self, run: RunReport, name: str, group: str, read: ReadRow) -> Any:
        """read(the group's row in the run), None where the run has no such row."""
        row = self.row(run, name, group)
        return None if row is None else read(row)

    def dense_row(self, name: str, group: str) -> GroupResult:
        """The group's row in the dense run, else in the first run that has it (dense_* fields are the same)."""
        return next(row for run in self.all_runs if (row := self.row(run, name, group)) is not None)

    def dense_figure(self, name: str, group: str, read: ReadRow) -> Any:
        """A dense_* figure of the group: the dense run's value, else the first run's that is not null."""
        for run in self.all_runs:
            value = self.value(run, name, group, read)
            if value is not None:
                return value
        return None

    def pruning_label(self, run: RunReport) -> str:
        """The label of the run's pruning method without its mitigation ('magnitude-global')."""
        return self._pruning_labels[run.id]

    def mitigated_methods(self) -> list[str]:
        """Pruning methods that have mitigated runs, in order of appearance."""
        mitigated = {self.pruning_label(r) for r in self.runs if r.mitigation != "none"}
        return [m for m in dict.fromkeys(self.pruning_label(r) for r in self.runs) if m in mitigated]

    def mitigation_labels(self) -> list[str]:
        return list(dict.fromkeys(["none", *(mitigation_label(r) for r in self.runs)]))

    def split_aggregates(self, run: RunReport, name: str, split: str) -> AttributeAggregates | None:
        """The attribute's aggregates on the 'eval' or the 'train' split."""
        train = run.train.attributes if run.train else []
        attributes: Sequence[AttributeMetrics] = run.attributes if split == "eval" else train
        return next((a.aggregates for a in attributes if a.attribute == name), None)

    def max_gap(self, run: RunReport, name: str, split: str) -> float | None:
        aggregates = self.split_aggregates(run, name, split)
        return None if aggregates is None else aggregates.max_excess_accuracy_gap
