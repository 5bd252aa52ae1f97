"""The gate's outputs from a report, without a server: the JUnit file as a JUnit parser reads it, GitHub's workflow
command escaping, the step summary, and the choice of run."""

from __future__ import annotations

import pytest
from junitparser import Failure, JUnitXml

from service.gate import GateInputError, annotation, annotation_lines, step_summary, verdict_of, write_junit


def run(ratio: float, checks: list[tuple[str, float | None, float]], reasons: list[str]) -> dict:
    return {
        "label": "magnitude-global",
        "ratio": ratio,
        "verdict": {
            "passed": not reasons,
            "reasons": reasons,
            "checks": [
                {
                    "name": name,
                    "attribute": "race",
                    "value": value,
                    "threshold": threshold,
                    "passed": not (value is None or value > threshold),
                }
                for name, value, threshold in checks
            ],
        },
    }


REPORT = {
    "verdict": {"passed": True, "summary": "passes: magnitude-global holds the policy up to 50% sparsity"},
    "runs": [
        run(0.5, [("max_excess_accuracy_gap", 0.004, 0.01), ("max_worst_group_drop", 0.02, 0.05)], []),
        run(
            0.9,
            [("max_excess_accuracy_gap", 0.031, 0.01), ("max_worst_group_drop", None, 0.05)],
            ["race: excess accuracy gap ψ 3.1 points (group 'b') exceeds the limit of 1.0 points", "race: no group"],
        ),
    ],
}


def test_junit_has_a_testcase_per_check_and_failures_with_figures(tmp_path):
    result = verdict_of("A1", REPORT, None, None)
    write_junit(result, tmp_path / "nested" / "gate.xml")
    xml = JUnitXml.fromfile(str(tmp_path / "nested" / "gate.xml"))
    suites = list(xml)
    assert [s.name for s in suites] == ["magnitude-global@0.5", "magnitude-global@0.9"]
    assert (xml.tests, xml.failures) == (4, 2) and [(s.tests, s.failures) for s in suites] == [(2, 0), (2, 2)]
    failures = [case.result[0] for case in suites[1]]
    assert all(isinstance(f, Failure) for f in failures)
    assert failures[0].message.startswith("race: excess accuracy gap ψ 3.1 points")
    assert failures[0].text == "max_excess_accuracy_gap of race: 0.031, limit 0.01"
    assert failures[1].text == "max_worst_group_drop of race: none (no group is large enough), limit 0.05"


def test_annotations_escape_and_level_follows_the_gate():
    assert annotation("error", "a: b, c", "50% done\nnext") == "::error title=a%3A b%2C c::50%25 done%0Anext"
    passing = annotation_lines(verdict_of("A1", REPORT, None, None))
    assert passing and all(
        line.startswith("::warning title=pruneaudit%3A magnitude-global at 90%25") for line in passing
    )
    failing = annotation_lines(verdict_of("A1", REPORT, "magnitude-global", 0.9))
    assert [line.split(" ", 1)[0] for line in failing] == ["::error", "::error", "::error"]


def test_step_summary_and_run_choice():
    summary = step_summary(verdict_of("A1", REPORT, None, None))
    assert summary.startswith("### pruneaudit gate: ✅ passes") and "| magnitude-global | 90% | fail |" in summary
    assert verdict_of("A1", REPORT, None, 0.5).passed is True
    with pytest.raises(GateInputError, match="magnitude-global@0.5, magnitude-global@0.9"):
        verdict_of("A1", REPORT, "channel-l1", None)
