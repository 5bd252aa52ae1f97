"""Start the real thing for tests: `pruneaudit api` and `pruneaudit worker` as separate processes, on a
database and broker given by URL, exactly as in production (no eager Celery, no fakes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    url: str
    env: dict  # with PRUNEAUDIT_API_KEY: the CLI clients (gate, demo) run as this stack's tenant
    var_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def api_key(self) -> str:
        return self.env["PRUNEAUDIT_API_KEY"]

    def client(self, api_key: str | None = None) -> httpx.Client:
        """An HTTP client of this stack's tenant (or of the tenant `api_key` belongs to)."""
        return httpx.Client(base_url=self.url, timeout=60, headers={"X-API-Key": api_key or self.api_key})

    def new_key(self, tenant: str) -> str:
        """An API key of another tenant (created if new), made by the `pruneaudit keys` CLI."""
        return create_key(self.env, tenant)

    def log(self, name: str) -> str:
        return (self.var_dir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def stack_env(
    var_dir: Path,
    *,
    database_url: str | None = None,
    broker_url: str | None = None,
    key_prefix: str = "",
    port: int | None = None,
) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNEAUDIT_")}
    env["PRUNEAUDIT_VAR_DIR"] = str(var_dir)
    # Off unless a test turns it on (settings=…): fuzzing and polling must reach the handlers.
    env["PRUNEAUDIT_RATE_LIMIT_PER_S"] = "0"
    # Unique per stack: two test runs on one machine share Redis, and pytest's temp dir names repeat.
    env["PRUNEAUDIT_QUEUE_NAME"] = f"pruneaudit-test-{var_dir.name}-{uuid.uuid4().hex[:8]}"
    if database_url:
        env["PRUNEAUDIT_DATABASE_URL"] = database_url
    if broker_url:
        env["PRUNEAUDIT_BROKER_URL"] = broker_url
    if key_prefix:
        env["PRUNEAUDIT_BROKER_KEY_PREFIX"] = key_prefix
    if port:
        env["PRUNEAUDIT_PORT"] = str(port)
    return env


def create_key(env: dict, tenant: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--tenant", tenant],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip().splitlines()[-1]


def start_process(stack: Stack, name: str, args: list[str]) -> None:
    log = (stack.var_dir / f"{name}.log").open("wb")
    stack.processes[name] = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args], env=stack.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )


def wait_until_answering(stack: Stack, name: str, url: str, path: str = "/readyz") -> None:
    """Until `url` + `path` answers 200 (`/healthz`: the process is up, ready or not)."""
    deadline = time.monotonic() + 120  # generous: CI machines are shared and sometimes slow
    while time.monotonic() < deadline:
        if stack.processes[name].poll() is not None:
            stack.stop()
            raise RuntimeError(f"{name} exited early:\n{stack.log(name)}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stack.stop()
    raise RuntimeError(f"{name} not answering at {url}{path}:\n{stack.log(name)}")


def start_api(stack: Stack, name: str) -> str:
    """Another API process of the stack (same database, broker, blobs and var dir) on its own port; its URL."""
    port = free_port()
    start_process(stack, name, ["api", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_until_answering(stack, name, url)
    return url


def start_stack(
    var_dir: Path,
    *,
    with_worker: bool = True,
    settings: dict[str, str] | None = None,
    ready_path: str = "/readyz",
    **urls,
) -> Stack:
    """`settings`: extra PRUNEAUDIT_* variables for every process of the stack; `ready_path`: what must answer 200
    before the stack is returned (`/healthz` for a stack meant to be unready)."""
    var_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    stack = Stack(
        url=f"http://127.0.0.1:{port}",
        env={**stack_env(var_dir, port=port, **urls), **(settings or {})},
        var_dir=var_dir,
    )
    subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate"], env=stack.env, cwd=REPO, check=True, capture_output=True
    )
    stack.env["PRUNEAUDIT_API_KEY"] = create_key(stack.env, "tests")
    if with_worker:
        start_process(stack, "worker", ["worker"])
    start_process(stack, "api", ["api", "--port", str(port)])
    wait_until_answering(stack, "api", stack.url, ready_path)
    return stack


DEPLOYMENTS = ["embedded", "postgres-redis"]


def start_deployment(request, var_dir: Path, database_url: str | None = None) -> Stack:
    """The stack of a fixture parametrized over DEPLOYMENTS: embedded (SQLite + SQLite broker) or real PostgreSQL +
    Redis (the conftest's redis_broker, and `database_url` or else the session's postgres_url)."""
    urls = {}
    if request.param == "postgres-redis":
        broker_url, prefix = request.getfixturevalue("redis_broker")
        database_url = database_url or request.getfixturevalue("postgres_url")
        urls = {"database_url": database_url, "broker_url": broker_url, "key_prefix": prefix}
    return start_stack(var_dir, **urls)


def assert_problem(response, status: int, *fragments: str) -> dict:
    """An RFC 9457 problem+json answer with this status, whose detail holds every fragment."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"].startswith("http")
    assert "/problems/" in body["type"]  # a page on the API (tests/integration/test_problem_pages.py)
    for fragment in fragments:
        assert fragment in body["detail"], body
    return body


def wait_for_audit(client: httpx.Client, audit_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        audit = client.get(f"/v1/audits/{audit_id}").json()
        if audit["status"] not in ("queued", "running"):
            return audit
        time.sleep(0.3)
    raise AssertionError(f"audit {audit_id} did not finish in {timeout_s} s: {audit}")
