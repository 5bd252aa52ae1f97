"""`make run` is `pruneaudit serve --demo`: the API comes up, a worker starts, and the demo audit on
scikit-learn's digits succeeds through the HTTP API; its report holds per-group metrics for every ratio."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
import psutil

from tests.integration.stack import REPO, free_port, stack_env


def test_serve_with_demo_reaches_a_succeeded_audit(tmp_path):
    port = free_port()
    env = stack_env(tmp_path, port=port)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--demo", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        match = None
        while time.monotonic() < deadline and serve.poll() is None:
            match = re.search(r"demo audit succeeded; report: (\S+)", log_path.read_text(errors="replace"))
            if match:
                break
            time.sleep(0.5)
        output = log_path.read_text(errors="replace")
        assert match, output
        # serve prints a key of the local tenant, the one the demo ran as; reports answer only with it.
        key = re.search(r"API key for tenant 'local' .*: (pa_\S+)", output).group(1)
        assert httpx.get(match.group(1), timeout=30).status_code == 401
        report = httpx.get(match.group(1), headers={"X-API-Key": key}, timeout=30).json()
        assert [run["ratio"] for run in report["runs"]] == [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]
        for run in report["runs"]:
            (digit,) = run["attributes"]
            assert len(digit["groups"]) == 10 and sum(g["n"] for g in digit["groups"]) == report["dataset"]["rows"]
        assert "verdict" in output
        assert httpx.get(match.group(1) + ".html", headers={"X-API-Key": key}, timeout=30).status_code == 200
        share_link = re.search(r"report for people \(a share link, opens in a browser\): (\S+)", output).group(1)
        assert httpx.get(share_link, timeout=30).status_code == 200
        assert serve.poll() is None, "serve must keep the API up after the demo"
    finally:
        serve.terminate()
        serve.wait(timeout=60)
    assert serve.returncode == 0


def test_serve_children_die_with_it(tmp_path):
    """Killed hard (kill -9, a CI timeout), `serve` leaves no API or worker behind holding the port."""
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=stack_env(tmp_path, port=port),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    children = psutil.Process(serve.pid).children(recursive=True)
    assert len(children) >= 2
    serve.kill()
    serve.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
