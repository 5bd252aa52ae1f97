"""report.csv is safe to open in a spreadsheet: a group value that reads as a formula is written as text (OWASP CSV
injection: a leading ' before = + - @ tab CR), numbers exactly as in the JSON."""

from __future__ import annotations

import csv
import io
import json

from service.audits import report_csv
from service.schemas.reports import AuditReport
from tests.unit.test_report_html import make_report

FORMULAS = ["=cmd|' /C calc'!A0", "+SUM(A1:A9)", "-2+3", "@SUM(A1)", "\tTAB", "\rCR"]


def test_formula_like_group_values_are_written_as_text():
    text = json.dumps(make_report())
    for name, formula in zip(["female", "male", "nonbinary"], FORMULAS, strict=False):
        text = text.replace(json.dumps(name), json.dumps(formula))
    rows = list(csv.DictReader(io.StringIO(report_csv(AuditReport.model_validate(json.loads(text))))))
    assert {row["group"] for row in rows} == {"'" + formula for formula in FORMULAS[:3]}
    assert not [cell for row in rows for cell in row.values() if cell[:1] in ("=", "+", "@", "\t", "\r")]
    # Numbers stay numbers: a negative one keeps its sign, unprefixed.
    negative = [row["excess_accuracy_gap"] for row in rows if row["excess_accuracy_gap"].startswith("-")]
    assert negative and negative == [repr(float(gap)) for gap in negative]
