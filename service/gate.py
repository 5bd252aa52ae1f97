"""`pruneaudit gate`: a CI step that fails the pipeline when an audit's policy verdict fails.

Exit codes: 0 the policy passes, 1 it fails, 2 no verdict could be had (server unreachable, a non-JSON answer from a
proxy, a refused spec, the audit failed or was cancelled, the wait timed out, a bad --method/--ratio). An error is
never 1, so a pipeline can tell "the model is unfair" from "the gate could not run".

Outputs besides the exit code and a one-line summary: a JUnit XML file (`--junit`: one testsuite per gated run, one
testcase per policy check, a failing check as <failure> with its figures, which GitLab and most CI servers show),
GitHub Actions annotations (`::error` / `::warning` lines, when GITHUB_ACTIONS=true or with --github-annotations)
and a Markdown table appended to $GITHUB_STEP_SUMMARY when that is set."""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from service.client import ApiClient, ClientError

PASS, FAIL, ERROR = 0, 1, 2


@dataclass
class GateResult:
    """What the gate decided, and over which runs (the report's run objects, each with its verdict)."""

    audit_id: str
    passed: bool
    summary: str
    runs: list[dict]


def add_arguments(parser: argparse.ArgumentParser, default_url: str, default_key: str | None) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("audit_id", nargs="?", help="an existing audit's id")
    target.add_argument("--spec", type=Path, help="an audit spec (JSON, as POST /v1/audits takes): submit, then wait")
    parser.add_argument("--url", default=default_url)
    parser.add_argument("--key", default=default_key, help="API key (default: $PRUNEAUDIT_API_KEY)")
    parser.add_argument("--method", help="a run label, e.g. magnitude-global (default: the audit's overall verdict)")
    parser.add_argument("--ratio", type=float, help="the pruning ratio of the run to gate on")
    parser.add_argument("--wait", action="store_true", help="poll until the audit ends (implied by --spec)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits (default 3600)")
    parser.add_argument("--poll-interval", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--junit", type=Path, help="write a JUnit XML report here")
    parser.add_argument(
        "--github-annotations",
        action="store_true",
        help="print GitHub Actions ::error/::warning lines (on by itself when GITHUB_ACTIONS=true)",
    )


def run_gate(args: argparse.Namespace) -> int:
    annotate = args.github_annotations or os.environ.get("GITHUB_ACTIONS") == "true"
    try:
        result = decide(args)
    except (ClientError, GateInputError) as exc:
        print(f"gate: error: {exc}", file=sys.stderr)
        if annotate:
            print(annotation("error", "pruneaudit gate: no verdict", str(exc)))
        return ERROR
    print(f"gate: {result.summary}")
    if args.junit:
        write_junit(result, args.junit)
    if annotate:
        for line in annotation_lines(result):
            print(line)
    if summary_path := os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(summary_path, "a", encoding="utf-8") as summary:
            summary.write(step_summary(result))
    return PASS if result.passed else FAIL


class GateInputError(Exception):
    """A gate invocation that cannot give a verdict (bad spec file, no such run): exit 2."""


def decide(args: argparse.Namespace) -> GateResult:
    client = ApiClient(args.url, args.key)
    audit_id = args.audit_id
    if args.spec is not None:
        try:
            spec = json.loads(args.spec.read_text())
        except (OSError, ValueError) as exc:
            raise GateInputError(f"cannot read the spec {args.spec}: {exc}") from exc
        audit_id = client.submit_audit(spec)["id"]
        print(f"gate: submitted audit {audit_id}", flush=True)
    if args.wait or args.spec is not None:
        audit = client.wait_for_audit(audit_id, args.timeout, args.poll_interval)
        if audit.get("status") != "succeeded":
            reason = audit.get("error") or "no reason given"
            raise GateInputError(f"audit {audit_id} ended {audit.get('status')}: {reason}")
    try:
        return verdict_of(audit_id, client.report(audit_id), args.method, args.ratio)
    except (KeyError, TypeError) as exc:
        raise GateInputError(f"the report of audit {audit_id} lacks {exc}; is the server a pruneaudit API?") from exc


def verdict_of(audit_id: str, report: dict, method: str | None, ratio: float | None) -> GateResult:
    runs = report["runs"]
    if method is None and ratio is None:
        verdict = report["verdict"]
        return GateResult(audit_id, bool(verdict["passed"]), verdict["summary"], runs)
    chosen = [
        run
        for run in runs
        if (method is None or run["label"] == method) and (ratio is None or abs(run["ratio"] - ratio) < 1e-9)
    ]
    if len(chosen) != 1:
        available = ", ".join(f"{run['label']}@{run['ratio']:g}" for run in runs)
        raise GateInputError(f"--method/--ratio must pick exactly one run; this audit has: {available}")
    (run,) = chosen
    verdict = run["verdict"]
    outcome = "passes" if verdict["passed"] else "fails: " + "; ".join(verdict["reasons"])
    return GateResult(
        audit_id, bool(verdict["passed"]), f"{run['label']} at {run['ratio']:.0%} sparsity {outcome}", [run]
    )


def run_name(run: dict) -> str:
    return f"{run['label']}@{run['ratio']:g}"


def figures(check: dict) -> str:
    value = "none (no group is large enough)" if check["value"] is None else f"{check['value']:.6g}"
    return f"{check['name']} of {check['attribute']}: {value}, limit {check['threshold']:.6g}"


def write_junit(result: GateResult, path: Path) -> None:
    """One <testsuite> per run, one <testcase> per policy check; a failing check is a <failure> whose message is the
    run's reason in words and whose text holds the figures."""
    suites = ET.Element("testsuites", name=f"pruneaudit audit {result.audit_id}")
    for run in result.runs:
        checks = run["verdict"]["checks"]
        reasons = iter(run["verdict"]["reasons"])
        failed = sum(not check["passed"] for check in checks)
        suite = ET.SubElement(
            suites, "testsuite", name=run_name(run), tests=str(len(checks)), failures=str(failed), errors="0"
        )
        for check in checks:
            case = ET.SubElement(
                suite,
                "testcase",
                name=f"{check['name']}[{check['attribute']}]",
                classname=f"pruneaudit.{run_name(run)}",
            )
            if not check["passed"]:
                # The verdict lists its reasons in the order of its failing checks (service/policy.py).
                failure = ET.SubElement(case, "failure", message=next(reasons, figures(check)), type="policy")
                failure.text = figures(check)
    total = sum(int(suite.get("tests", "0")) for suite in suites)
    suites.set("tests", str(total))
    suites.set("failures", str(sum(int(suite.get("failures", "0")) for suite in suites)))
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def _escape(text: str, *, property_value: bool = False) -> str:
    # GitHub's workflow command escaping: data escapes %, CR, LF; property values also ':' and ','.
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if property_value else text


def annotation(level: str, title: str, message: str) -> str:
    return f"::{level} title={_escape(title, property_value=True)}::{_escape(message)}"


def annotation_lines(result: GateResult) -> list[str]:
    """A failing check is an error when the gate fails, a warning when the gate passes anyway (a higher ratio failing
    is expected while a lower one passes)."""
    level = "warning" if result.passed else "error"
    lines = []
    for run in result.runs:
        for reason in run["verdict"]["reasons"]:
            lines.append(annotation(level, f"pruneaudit: {run['label']} at {run['ratio']:.0%} sparsity", reason))
    if not result.passed:
        lines.append(annotation("error", "pruneaudit gate", result.summary))
    return lines


def step_summary(result: GateResult) -> str:
    mark = "✅ passes" if result.passed else "❌ fails"
    rows = "".join(
        f"| {run['label']} | {run['ratio']:.0%} | {'pass' if run['verdict']['passed'] else 'fail'} | "
        f"{'; '.join(run['verdict']['reasons']).replace('|', '/') or '—'} |\n"
        for run in result.runs
    )
    return (
        f"### pruneaudit gate: {mark}\n\n"
        f"Audit `{result.audit_id}`: {result.summary}\n\n"
        "| method | sparsity | policy | reasons |\n|---|---|---|---|\n"
        f"{rows}\n"
    )
