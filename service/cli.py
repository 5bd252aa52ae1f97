"""`pruneaudit` command line: migrate, api, worker, sweeper, serve (API + one worker + the sweeper, embedded
defaults), demo.
Workers and the demo run as separate processes: the service never imports the worker (or torch)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx

from service import gate, mlflow_log
from service.cli_schedules import add_schedule_commands
from service.db import session_scope
from service.settings import get_settings

# Clients (demo, gate) read their API key from here; `serve` makes one for the local tenant.
API_KEY_ENV = "PRUNEAUDIT_API_KEY"
LOCAL_TENANT = "local"


def prepare_stores() -> None:
    """Migrate the database and declare the broker queue: run before the API and workers start."""
    from service.migrate import upgrade_to_head
    from service.queue import declare_queue

    upgrade_to_head()
    declare_queue()


def cmd_migrate(_args: argparse.Namespace) -> int:
    prepare_stores()
    print(f"database at head: {get_settings().resolved_database_url()}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.http_server import server_options
    from service.logs import configure_logging

    settings = get_settings()
    # Before prometheus_client is imported: request counters go to files every API process of this host adds up.
    metrics_dir = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str((settings.var_dir / "prometheus").resolve()))
    os.makedirs(metrics_dir, exist_ok=True)
    configure_logging(settings.log_format)
    # No migration here (that is `pruneaudit migrate`, a one-shot job): the API starts while the database is down
    # or not yet migrated, and answers 503 (/readyz and /v1) until it is there.
    # JSON: uvicorn's loggers propagate to the root's JSON handler; text: uvicorn keeps its own format.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        log_level="info",
        log_config=log_config,
        access_log=False,  # service/metrics.py logs each request with its route, duration and request id
        **server_options(settings),
    )
    return 0


def worker_queues(gpu: bool) -> str:
    """The queues a worker takes: a GPU worker takes the heavy tasks' queue and, when idle, the default one."""
    settings = get_settings()
    if not gpu:
        return settings.queue_name
    if not settings.gpu_queue:
        raise SystemExit("pruneaudit worker --gpu: set PRUNEAUDIT_GPU_QUEUE (the queue heavy tasks are sent to)")
    return f"{settings.gpu_queue},{settings.queue_name}"


def worker_command(concurrency: int, loglevel: str, gpu: bool = False, name: str | None = None) -> list[str]:
    settings = get_settings()
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--queues",
        worker_queues(gpu),
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        # The node name reports show for each run (celery@<host> unless named; %h is the host).
        *(["--hostname", name] if name else []),
        # A child is replaced after this many audits, or after an audit that grew it past the memory cap (KiB);
        # worker/heartbeat.py enforces the same cap while an audit runs.
        "--max-tasks-per-child",
        str(settings.worker_max_tasks_per_child),
        *(
            ["--max-memory-per-child", str(settings.worker_max_memory_mb * 1024)]
            if settings.worker_max_memory_mb
            else []
        ),
        # Remote control is not used, and the SQLite transport has no fanout exchange for it.
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]


def cmd_worker(args: argparse.Namespace) -> int:
    command = worker_command(args.concurrency, args.loglevel, args.gpu, args.name)
    if args.gpu:
        # Its tasks read it (worker/placement.py): a GPU worker computes a heavy task it receives, never forwards it.
        os.environ["PRUNEAUDIT_WORKER_GPU"] = "true"
    os.execv(command[0], command)


def cmd_sweeper(_args: argparse.Namespace) -> int:
    from service.logs import configure_logging
    from service.recovery import run_sweeper

    configure_logging(get_settings().log_format)
    run_sweeper()
    return 0


def wait_ready(url: str, timeout_s: float, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise SystemExit(f"a child process exited early with code {process.returncode}: {process.args!r}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the API did not become ready at {url} within {timeout_s:.0f} s")


def die_with_parent() -> None:
    """Runs in a child before exec: the child gets SIGTERM when `serve` dies, so no orphan holds the port."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_demo(url: str, key: str | None) -> int:
    return subprocess.call(
        [sys.executable, "-m", "worker.demo", "--url", url], env={**os.environ, API_KEY_ENV: key or ""}
    )


def cmd_serve(args: argparse.Namespace) -> int:
    prepare_stores()
    url = f"http://{args.host}:{args.port}"
    cli = [sys.executable, "-m", "service.cli"]
    children = [
        subprocess.Popen(cli + ["worker", "--concurrency", "1"], preexec_fn=die_with_parent),
        subprocess.Popen(cli + ["sweeper"], preexec_fn=die_with_parent),
        subprocess.Popen(cli + ["api", "--host", args.host, "--port", str(args.port)], preexec_fn=die_with_parent),
    ]

    def stop(*_):
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wait_ready(url, 120, children)
    print(f"pruneaudit API: {url}  (Swagger UI: {url}/docs)", flush=True)
    key = create_key(LOCAL_TENANT, "serve")
    print(
        f"API key for tenant '{LOCAL_TENANT}' (shown once; send it as X-API-Key, or click Authorize in "
        f"Swagger UI): {key}",
        flush=True,
    )
    if args.demo and run_demo(url, key) != 0:
        print("the demo audit did not succeed; the API stays up for inspection", flush=True)
    while all(child.poll() is None for child in children):
        time.sleep(1)
    stop()
    return 1


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.url, args.key)


def create_key(tenant: str, name: str | None) -> str:
    from service.tenancy import create_key as create

    with session_scope() as session:
        return create(session, tenant, name)[1]


def cmd_keys(args: argparse.Namespace) -> int:
    from service.migrate import upgrade_to_head
    from service.tenancy import revoke_key

    upgrade_to_head()
    if args.action == "create":
        print(create_key(args.tenant, args.name))
        return 0
    with session_scope() as session:
        key = revoke_key(session, args.key_id)
        print(f"revoked key {key.id} (tenant {key.tenant_id}) at {key.revoked_at}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    return gate.run_gate(args)


def build_parser() -> argparse.ArgumentParser:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="pruneaudit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("migrate", help="apply database migrations and declare the broker queue").set_defaults(
        func=cmd_migrate
    )

    api = commands.add_parser("api", help="run the HTTP API (run `migrate` first; until then it answers 503)")
    api.add_argument("--host", default=settings.host)
    api.add_argument("--port", type=int, default=settings.port)
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--name", help="Celery node name, e.g. gpu1@%%h (default celery@<host>)")
    worker.add_argument(
        "--gpu", action="store_true", help="also take PRUNEAUDIT_GPU_QUEUE, the heavy baselines and runs"
    )
    worker.set_defaults(func=cmd_worker)

    commands.add_parser(
        "sweeper",
        help="re-queue audits whose worker vanished and re-send queued audits whose broker message was lost",
    ).set_defaults(func=cmd_sweeper)

    serve = commands.add_parser(
        "serve", help="run the API, one worker and the sweeper (embedded defaults need no server)"
    )
    serve.add_argument("--host", default=settings.host)
    serve.add_argument("--port", type=int, default=settings.port)
    serve.add_argument("--demo", action="store_true", help="once up, run the demo audit on real data")
    serve.set_defaults(func=cmd_serve)

    gate_parser = commands.add_parser(
        "gate",
        help="exit 1 when an audit's policy verdict fails, 2 when there is none (for CI pipelines; JUnit, GitHub)",
    )
    gate.add_arguments(gate_parser, f"http://{settings.host}:{settings.port}", os.environ.get(API_KEY_ENV))
    gate_parser.set_defaults(func=cmd_gate)
    mlflow_log.add_command(commands, f"http://{settings.host}:{settings.port}", os.environ.get(API_KEY_ENV))

    demo = commands.add_parser("demo", help="run the demo audit against a running API")
    demo.add_argument("--url", default=f"http://{settings.host}:{settings.port}")
    demo.add_argument("--key", default=os.environ.get(API_KEY_ENV), help=f"API key (default: ${API_KEY_ENV})")
    demo.set_defaults(func=cmd_demo)

    keys = commands.add_parser("keys", help="create or revoke API keys (keys are stored hashed, shown once)")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = key_actions.add_parser("create", help="a new key for a tenant (created if new); prints the key")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="what the key is for, e.g. ci-pipeline")
    revoke = key_actions.add_parser("revoke", help="revoke a key by its id (the part after pa_, or the whole key)")
    revoke.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)
    add_schedule_commands(commands, f"http://{settings.host}:{settings.port}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
