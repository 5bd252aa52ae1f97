"""`pruneaudit gate` as a CI step, run as a process: --spec submits and waits for a real audit on the embedded stack;
exit 0/1 follows the policy, and 2 means no verdict (unreachable server, a proxy's non-JSON 502, a failed audit, a
timeout), never a traceback. The JUnit file is read with junitparser, the GitHub step summary and annotations as
the runner would see them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from junitparser import Failure, JUnitXml

from tests.integration.stack import REPO, free_port, start_stack

RATIOS = [0.3, 0.6]
# Pruning this MLP moves some digit's accuracy by more than 0 points even at 30 %; no group can drop by more than 100.
FAILING_POLICY = {"max_excess_accuracy_gap": 0.0, "max_worst_group_drop": 0.0}
PASSING_POLICY = {"max_excess_accuracy_gap": 1.0, "max_worst_group_drop": 1.0, "min_group_size": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("gate"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def uploads(stack, digits_case):
    with stack.client() as client:
        return digits_case.upload_model(client).json()["id"], digits_case.upload_dataset(client).json()["id"]


def gate(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "gate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def spec_file(tmp_path, uploads, policy: dict):
    model_id, dataset_id = uploads
    path = tmp_path / "spec.json"
    spec = {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "group_by": ["digit"],
        "pruning": {"ratios": RATIOS, "methods": [{"method": "magnitude", "scope": "global", "ignored_layers": []}]},
        "diagnostics": {"curvature": "off"},
        "statistics": {"bootstrap_resamples": 0},
        "policy": policy,
    }
    path.write_text(json.dumps(spec))
    return path


def ci_run(stack, tmp_path, uploads, policy: dict):
    """The gate as a GitHub Actions step: --spec, JUnit, annotations (GITHUB_ACTIONS=true), step summary."""
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = {**stack.env, "GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    junit = tmp_path / "out" / "gate.xml"
    done = gate(
        env, "--spec", str(spec_file(tmp_path, uploads, policy)), "--url", stack.url, "--junit", str(junit), "--wait"
    )
    return done, JUnitXml.fromfile(str(junit)), summary.read_text()


def cases(xml: JUnitXml) -> list:
    return [(suite.name, case) for suite in xml for case in suite]


@pytest.mark.slow
def test_passing_policy_exits_0_with_junit_and_summary(stack, uploads, tmp_path):
    done, xml, summary = ci_run(stack, tmp_path, uploads, PASSING_POLICY)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "passes" in done.stdout
    # Two runs × two checks (max_excess_accuracy_gap, max_worst_group_drop) of one attribute.
    assert [suite.name for suite in xml] == [f"magnitude-global@{ratio:g}" for ratio in RATIOS]
    assert len(cases(xml)) == 4 and xml.tests == 4 and xml.failures == 0
    assert all(case.is_passed for _suite, case in cases(xml))
    assert {case.name for _suite, case in cases(xml)} == {
        "max_excess_accuracy_gap[digit]",
        "max_worst_group_drop[digit]",
    }
    assert "::error" not in done.stdout
    assert summary.startswith("earlier step\n")  # appended, as GitHub expects
    assert "pruneaudit gate: ✅ passes" in summary and "| magnitude-global | 30% | pass |" in summary


@pytest.mark.slow
def test_failing_policy_exits_1_with_failures_and_annotations(stack, uploads, tmp_path):
    done, xml, summary = ci_run(stack, tmp_path, uploads, FAILING_POLICY)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    failures = [(name, case) for name, case in cases(xml) if not case.is_passed]
    assert xml.tests == 4 and xml.failures == len(failures) >= 2
    # Every run fails somewhere: a limit of 0 points is broken by any group that loses accuracy.
    assert {name for name, _case in failures} == {f"magnitude-global@{ratio:g}" for ratio in RATIOS}
    for _name, case in failures:
        (failure,) = case.result
        assert isinstance(failure, Failure)
        assert "exceeds the limit of 0.0 points" in failure.message and "limit 0" in failure.text
    errors = [line for line in done.stdout.splitlines() if line.startswith("::error title=")]
    assert len(errors) == len(failures) + 1  # one per failing check, and the verdict
    # Workflow-command escaping: ':' and '%' in the title are escaped, the message keeps its ':'.
    assert any(
        line.startswith("::error title=pruneaudit%3A magnitude-global at 30%25 sparsity::digit: ") for line in errors
    )
    assert "❌ fails" in summary and "| magnitude-global | 60% | fail |" in summary


class FakeProxy(BaseHTTPRequestHandler):
    """What a pipeline meets when the API is down behind nginx (an HTML 502), or an audit that never ends or failed."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/v1/audits/stuck":
            self._send(200, "application/json", json.dumps({"id": "stuck", "status": "running"}))
        elif self.path == "/v1/audits/broken":
            self._send(200, "application/json", json.dumps({"id": "broken", "status": "failed", "error": "OOM"}))
        else:
            self._send(502, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>")

    def _send(self, status: int, content_type: str, body: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def fake_proxy():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_errors_exit_2_without_a_traceback(fake_proxy, tmp_path):
    # No API key, no stack: only the gate and whatever answers at --url.
    env = {"PATH": "/usr/bin:/bin", "GITHUB_ACTIONS": "true", "PRUNEAUDIT_VAR_DIR": str(tmp_path / "var")}
    invocations = {
        "proxy 502": ["some-audit", "--url", fake_proxy],
        "unreachable": ["some-audit", "--url", f"http://127.0.0.1:{free_port()}"],
        "timeout": ["stuck", "--url", fake_proxy, "--wait", "--timeout", "0.5", "--poll-interval", "0.1"],
        "failed audit": ["broken", "--url", fake_proxy, "--wait"],
        "bad spec": ["--spec", str(tmp_path / "missing.json"), "--url", fake_proxy],
    }
    # At once: each is a CLI process start, and they are independent.
    with ThreadPoolExecutor(len(invocations)) as pool:
        futures = {what: pool.submit(gate, env, *args) for what, args in invocations.items()}
        outcomes = {what: future.result() for what, future in futures.items()}
    for what, done in outcomes.items():
        assert done.returncode == 2, (what, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.startswith("gate: error: "), (what, done.stderr)
        assert "::error title=pruneaudit gate%3A no verdict::" in done.stdout, what
    assert "HTTP 502 with a non-JSON body (text/html)" in outcomes["proxy 502"].stderr
    assert "cannot reach" in outcomes["unreachable"].stderr
    assert "still running after 0.5 s" in outcomes["timeout"].stderr
    assert "ended failed: OOM" in outcomes["failed audit"].stderr
