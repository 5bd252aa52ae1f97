"""Crash safety (issue #7) on real processes, real Redis and real PostgreSQL: a worker killed with -9 while it
measures an audit's dense baseline, and while it computes one of its runs (only that run is redone), one that
keeps vanishing, a worker child over its memory cap, Redis restarted with audits queued, and PostgreSQL cut off
under the API. Recovery settings are shortened through the environment so this runs in seconds; the sweeper runs
as `pruneaudit sweeper`, exactly as deployed."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import httpx
import psutil
import pytest

from tests.conftest import POSTGRES_ADMIN_URL, in_ci, require_service
from tests.integration.stack import Stack, free_port, start_process, start_stack, wait_for_audit

FAST_RECOVERY = {
    "PRUNEAUDIT_HEARTBEAT_INTERVAL_S": "0.5",
    "PRUNEAUDIT_HEARTBEAT_TIMEOUT_S": "5",
    "PRUNEAUDIT_SWEEP_INTERVAL_S": "0.5",
    "PRUNEAUDIT_REQUEUE_QUEUED_AFTER_S": "2",
    "PRUNEAUDIT_MAX_ATTEMPTS": "2",
}
# Enough epochs that an attempt is still fine-tuning when it is killed, few enough to finish in seconds.
SLOW_EPOCHS = 20


def throwaway_database_url(name: str) -> str:
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A database of its own (as in tests/conftest.py's postgres_url): the sweeper recovers every audit in its
    database, so audits that other tests leave queued or running must not be in it."""
    import psycopg

    require_service("PostgreSQL", lambda: psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close())
    name = f"pruneaudit_crash_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_rows(database: str, query: str, *params) -> list[tuple]:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}") as connection:
        return connection.execute(query, params).fetchall()


class RedisServer:
    """A redis-server of our own, without persistence, so a restart really loses every message (the shared
    Redis on 6379 is never restarted)."""

    def __init__(self, directory) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client().ping()
                return
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def crash_database():
    with throwaway_database() as name:
        yield name


@pytest.fixture(scope="module")
def crash_stack(tmp_path_factory, crash_database, own_redis):
    """API + sweeper on PostgreSQL and our own Redis; each test starts (and kills) its own workers."""
    stack = start_stack(
        tmp_path_factory.mktemp("crash"),
        with_worker=False,
        database_url=throwaway_database_url(crash_database),
        broker_url=own_redis.url,
    )
    stack.env.update(FAST_RECOVERY)
    start_process(stack, "sweeper", ["sweeper"])
    yield stack
    stack.stop()


@dataclass
class Uploads:
    model_id: str
    dataset_id: str
    train_dataset_id: str


@pytest.fixture(scope="module")
def uploads(crash_stack, digits_case) -> Uploads:
    with crash_stack.client() as client:
        return Uploads(
            digits_case.upload_model(client).json()["id"],
            digits_case.upload_dataset(client).json()["id"],
            digits_case.upload_train_dataset(client).json()["id"],
        )


# Curvature with many probes makes the dense baseline take seconds: long enough to kill its worker during it.
SLOW_BASELINE = {"hutchinson_probes": 200, "power_iterations": 100, "max_examples_per_group": 1000}


def submit(
    client: httpx.Client,
    uploads: Uploads,
    *,
    epochs: int | None = None,
    ratios: tuple[float, ...] = (0.5,),
    diagnostics: dict | None = None,
) -> str:
    method = {"method": "magnitude", "scope": "global"}
    if epochs:
        method["fine_tuning"] = {"epochs": epochs, "lr": 0.001}
    created = client.post(
        "/v1/audits",
        json={
            "model_id": uploads.model_id,
            "dataset_id": uploads.dataset_id,
            "train_dataset_id": uploads.train_dataset_id,
            "group_by": ["digit"],
            "pruning": {"ratios": list(ratios), "methods": [method]},
            "diagnostics": diagnostics or {"curvature": "off"},
            "statistics": {"bootstrap_resamples": 0},
        },
    )
    assert created.status_code == 202, created.text
    return created.json()["id"]


def start_worker(stack: Stack, name: str, **env) -> subprocess.Popen:
    saved = dict(stack.env)
    stack.env.update(env)
    try:
        start_process(stack, name, ["worker"])
    finally:
        stack.env.clear()
        stack.env.update(saved)
    return stack.processes[name]


def kill_hard(process: subprocess.Popen) -> None:
    """kill -9 the Celery main process and its pool children: nothing gets to clean up or hand back."""
    parent = psutil.Process(process.pid)
    children = parent.children(recursive=True)
    for doomed in (parent, *children):  # the parent first, so it cannot fork a replacement child
        with suppress(psutil.NoSuchProcess):
            doomed.kill()
    process.wait()
    psutil.wait_procs(children, timeout=10)


def stop_gently(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_hard(process)


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def runs_of(database: str, audit_id: str) -> list[tuple]:
    """(position, status, attempts) of each stored run row, in report order."""
    return database_rows(
        database, "SELECT position, status, attempts FROM runs WHERE audit_id = %s ORDER BY position", audit_id
    )


def fine_tuning_run(client: httpx.Client, database: str, audit_id: str, attempt: int) -> int | None:
    """The position of the run that is fine-tuning in its `attempt`, if one is."""
    audit = client.get(f"/v1/audits/{audit_id}").json()
    if audit["status"] != "running" or "epoch" not in (audit["progress_message"] or ""):
        return None
    running = [position for position, status, attempts in runs_of(database, audit_id) if status == "running"]
    attempts = {position: attempts for position, _status, attempts in runs_of(database, audit_id)}
    return running[0] if len(running) == 1 and attempts[running[0]] == attempt else None


def measuring_baseline(client: httpx.Client, audit_id: str, attempt: int) -> bool:
    audit = client.get(f"/v1/audits/{audit_id}").json()
    return (
        audit["status"] == "running"
        and audit["attempts"] == attempt
        and audit["progress_message"] == "measuring the dense baseline"
    )


@pytest.mark.services
def test_worker_killed_while_measuring_the_baseline_is_recovered_by_a_new_worker(crash_stack, crash_database, uploads):
    """kill -9 of the worker and its child while it measures the dense baseline: the audit is left `running` with a
    stale heartbeat; the sweeper re-queues the whole audit and the next worker completes it, with one set of runs."""
    with crash_stack.client() as client:
        audit_id = submit(client, uploads, diagnostics=SLOW_BASELINE)
        first = start_worker(crash_stack, "worker-killed-in-baseline")
        try:
            wait_until(lambda: measuring_baseline(client, audit_id, 1), 120, "the first attempt to measure")
        finally:
            kill_hard(first)
        assert client.get(f"/v1/audits/{audit_id}").json()["status"] == "running"  # orphaned, for now
        second = start_worker(crash_stack, "worker-after-baseline-kill")
        try:
            audit = wait_for_audit(client, audit_id, timeout_s=180)
        finally:
            stop_gently(second)
    assert audit["status"] == "succeeded", (audit, crash_stack.log("worker-after-baseline-kill"))
    assert audit["attempts"] == 2 and audit["error"] is None
    assert runs_of(crash_database, audit_id) == [(0, "succeeded", 1), (1, "succeeded", 1)]  # stored once
    assert f"audit {audit_id}" in crash_stack.log("sweeper")


@pytest.mark.services
def test_worker_killed_mid_run_redoes_only_that_run(crash_stack, crash_database, uploads):
    """kill -9 of the worker and its child while one run fine-tunes: that run is left `running` with a stale
    heartbeat; the sweeper re-queues it alone and the next worker computes it and the runs still queued, each once.
    The audit keeps its first attempt."""
    with crash_stack.client() as client:
        audit_id = submit(client, uploads, epochs=SLOW_EPOCHS, ratios=(0.3, 0.5, 0.7))
        first = start_worker(crash_stack, "worker-killed-mid-run")
        try:
            killed = wait_until(lambda: fine_tuning_run(client, crash_database, audit_id, 1), 120, "a run to fine-tune")
        finally:
            kill_hard(first)
        assert client.get(f"/v1/audits/{audit_id}").json()["status"] == "running"  # orphaned, for now
        second = start_worker(crash_stack, "worker-after-run-kill")
        try:
            audit = wait_for_audit(client, audit_id, timeout_s=180)
        finally:
            stop_gently(second)
    assert audit["status"] == "succeeded", (audit, crash_stack.log("worker-after-run-kill"))
    assert audit["attempts"] == 1 and audit["error"] is None
    runs = runs_of(crash_database, audit_id)
    assert [position for position, _status, _attempts in runs] == [0, 1, 2, 3]  # stored once
    assert {status for _position, status, _attempts in runs} == {"succeeded"}
    assert {position: attempts for position, _status, attempts in runs} == {
        position: 2 if position == killed else 1 for position in range(4)
    }
    assert "sent no heartbeat" in crash_stack.log("sweeper")


@pytest.mark.services
def test_run_whose_worker_keeps_vanishing_fails_its_audit_at_the_attempt_cap(crash_stack, crash_database, uploads):
    with crash_stack.client() as client:
        audit_id = submit(client, uploads, epochs=10 * SLOW_EPOCHS)
        for attempt in (1, 2):  # PRUNEAUDIT_MAX_ATTEMPTS=2
            worker = start_worker(crash_stack, f"worker-vanishing-{attempt}")
            try:
                wait_until(
                    lambda attempt=attempt: fine_tuning_run(client, crash_database, audit_id, attempt),
                    120,
                    f"attempt {attempt} of the run to fine-tune",
                )
            finally:
                kill_hard(worker)
        audit = wait_for_audit(client, audit_id, timeout_s=60)
    assert audit["status"] == "failed", audit
    assert audit["attempts"] == 1
    assert audit["error"].startswith("run magnitude-global-finetuned: the worker running this run vanished 2 times")
    assert "giving up after 2 attempts" in audit["error"]
    assert runs_of(crash_database, audit_id) == [(0, "succeeded", 1), (1, "failed", 2)]


@pytest.mark.services
def test_worker_child_over_the_memory_cap_fails_only_its_audit(crash_stack, uploads):
    """A cap far below what torch alone needs: the audit fails at once with the reason, the child is
    replaced and the worker itself keeps running."""
    worker = start_worker(crash_stack, "worker-capped", PRUNEAUDIT_WORKER_MAX_MEMORY_MB="50")
    try:
        children = wait_until(lambda: psutil.Process(worker.pid).children(), 60, "the worker's pool child")
        with crash_stack.client() as client:
            audit = wait_for_audit(client, submit(client, uploads), timeout_s=120)
        assert audit["status"] == "failed", audit
        assert "above the worker's cap of 50 MiB" in audit["error"] and audit["attempts"] == 1
        assert worker.poll() is None
        replaced = wait_until(
            lambda: [c for c in psutil.Process(worker.pid).children() if c not in children],
            60,
            "a replacement pool child",
        )
        assert replaced
    finally:
        stop_gently(worker)


def waiting_messages(server: RedisServer, queue: str, audit_ids: list[str]) -> dict[str, int]:
    """How many messages wait in the queue for each audit (earlier tests may leave others there)."""
    from service.queue import RUN_AUDIT_TASK
    from service.recovery import ids_in

    raw_messages = server.client().lrange(queue, 0, -1)
    carried = Counter(audit_id for raw in raw_messages for audit_id in ids_in([raw], RUN_AUDIT_TASK))
    return {audit_id: carried[audit_id] for audit_id in audit_ids}


@pytest.mark.services
def test_redis_restart_loses_queued_messages_and_every_audit_still_runs_once(
    crash_stack, crash_database, own_redis, uploads
):
    queue = crash_stack.env["PRUNEAUDIT_QUEUE_NAME"]
    with crash_stack.client() as client:
        audit_ids = [submit(client, uploads) for _ in range(3)]
        once_each = dict.fromkeys(audit_ids, 1)
        # Past the lost-message threshold the sweeper sees their messages in Redis and sends no duplicate.
        time.sleep(float(FAST_RECOVERY["PRUNEAUDIT_REQUEUE_QUEUED_AFTER_S"]) + 2)
        assert waiting_messages(own_redis, queue, audit_ids) == once_each

        server_before = own_redis.client().info("server")["run_id"]
        own_redis.kill()
        own_redis.start()
        # A fresh server without persistence: every message is gone (the sweeper's log below says it found each
        # audit without one; reading the queue here would race the sweeper's next pass).
        assert own_redis.client().info("server")["run_id"] != server_before
        wait_until(
            lambda: all(waiting_messages(own_redis, queue, audit_ids).values()),
            30,
            "the sweeper to enqueue the audits again",
        )
        time.sleep(2)
        assert waiting_messages(own_redis, queue, audit_ids) == once_each  # live again, so sent only once
        assert all(client.get(f"/v1/audits/{a}").json()["status"] == "queued" for a in audit_ids)

        worker = start_worker(crash_stack, "worker-after-redis-restart")
        try:
            audits = [wait_for_audit(client, audit_id, timeout_s=180) for audit_id in audit_ids]
        finally:
            stop_gently(worker)
    for audit in audits:
        assert audit["status"] == "succeeded", (audit, crash_stack.log("worker-after-redis-restart"))
        assert audit["attempts"] == 1
        assert runs_of(crash_database, audit["id"]) == [(0, "succeeded", 1), (1, "succeeded", 1)]
    sweeper_log = crash_stack.log("sweeper")
    assert all(f"audit {a}: queued with no broker message" in sweeper_log for a in audit_ids)


class CuttableProxy:
    """A TCP proxy in front of PostgreSQL that can drop every connection and refuse new ones, so the API
    loses its database without the shared server being stopped."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.severed = threading.Event()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                incoming, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.severed.is_set():
                incoming.close()
                continue
            outgoing = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [incoming, outgoing]
            threading.Thread(target=self._pump, args=(incoming, outgoing), daemon=True).start()
            threading.Thread(target=self._pump, args=(outgoing, incoming), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def sever(self) -> None:
        self.severed.set()
        with self.lock:
            doomed, self.sockets = self.sockets, []
        for sock in doomed:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.severed.clear()

    def close(self) -> None:
        self.sever()
        self.listener.close()


def assert_database_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"
    body = response.json()
    assert body["type"].endswith("/database-unavailable") and body["status"] == 503
    assert "database cannot be reached" in body["detail"] and "Idempotency-Key" in body["detail"]


@pytest.fixture
def outage_database():
    with throwaway_database() as name:
        yield name


@pytest.mark.services
def test_postgres_unavailable_gives_503_and_the_api_recovers(tmp_path, outage_database, digits_case):
    from urllib.parse import urlsplit

    admin = urlsplit(POSTGRES_ADMIN_URL)
    proxy = CuttableProxy((admin.hostname, admin.port or 5432))
    database_url = throwaway_database_url(outage_database).replace(
        f"{admin.hostname}:{admin.port or 5432}", f"127.0.0.1:{proxy.port}"
    )
    stack = start_stack(tmp_path, with_worker=False, database_url=database_url)
    try:
        with stack.client() as client:
            model = digits_case.upload_model(client).json()
            dataset = digits_case.upload_dataset(client).json()
            spec = {"model_id": model["id"], "dataset_id": dataset["id"], "group_by": ["digit"]}
            before = client.post("/v1/audits", json=spec)
            assert before.status_code == 202

            proxy.sever()
            readiness = client.get("/readyz")
            assert_database_unavailable(readiness)
            assert client.get("/healthz").status_code == 200  # alive, only not ready
            assert_database_unavailable(client.get("/v1/audits"))
            assert_database_unavailable(client.get(f"/v1/audits/{before.json()['id']}"))
            assert_database_unavailable(client.post("/v1/audits", json=spec))

            proxy.restore()
            assert client.get("/readyz").status_code == 200
            listed = client.get("/v1/audits").json()
            assert [item["id"] for item in listed["items"]] == [before.json()["id"]]  # nothing lost, nothing half-made
            assert client.get(f"/v1/models/{model['id']}").status_code == 200
            assert client.post("/v1/audits", json=spec).status_code == 202
        assert "Traceback" not in stack.log("api")
    finally:
        stack.stop()
        proxy.close()


def live_ids(settings, task: str) -> set[str]:
    """The ids that messages of `task` in the broker carry, as the sweeper reads them."""
    from service.recovery import ids_in, live_messages

    messages = live_messages(settings)
    assert messages is not None, "Redis and the SQLite broker can be inspected"
    return ids_in(messages, task)


def consume_without_ack(app, queue: str, audit_id: str):
    """What a worker does on delivery (late acks): take the message, ack only when the task ends."""
    connection = app.connection_for_read()
    simple = connection.SimpleQueue(queue)
    message = simple.get(timeout=10)
    assert message.payload[0] == [audit_id]  # task protocol 2: [args, kwargs, embed]
    return connection, simple, message


@pytest.mark.services
def test_sweeper_sees_waiting_and_unacked_messages_in_redis_under_a_key_prefix(redis_broker):
    from celery import Celery

    from service.queue import COMPUTE_RUN_TASK, RUN_AUDIT_TASK, celery_config
    from service.settings import Settings

    url, prefix = redis_broker
    settings = Settings(broker_url=url, broker_key_prefix=prefix, queue_name=f"inspect-{uuid.uuid4().hex[:8]}")
    app = Celery("inspect")
    app.conf.update(celery_config(settings))
    audit_id, run_id = uuid.uuid4().hex, uuid.uuid4().hex
    assert audit_id not in live_ids(settings, RUN_AUDIT_TASK)
    app.send_task(RUN_AUDIT_TASK, args=[audit_id], queue=settings.queue_name)
    assert audit_id in live_ids(settings, RUN_AUDIT_TASK)  # waiting in the queue's list
    connection, simple, message = consume_without_ack(app, settings.queue_name, audit_id)
    try:
        assert audit_id in live_ids(settings, RUN_AUDIT_TASK)  # delivered, not acked: a worker holds it
        message.ack()
        assert audit_id not in live_ids(settings, RUN_AUDIT_TASK)
        # Run messages are told apart from audit messages by their task name.
        app.send_task(COMPUTE_RUN_TASK, args=[run_id], queue=settings.queue_name)
        assert run_id in live_ids(settings, COMPUTE_RUN_TASK) and run_id not in live_ids(settings, RUN_AUDIT_TASK)
    finally:
        simple.close()
        connection.release()


def test_sweeper_sees_waiting_messages_in_the_embedded_sqlite_broker(tmp_path):
    from celery import Celery

    from service.queue import RUN_AUDIT_TASK, celery_config
    from service.settings import Settings

    settings = Settings(
        var_dir=tmp_path, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}", queue_name="inspect"
    )
    assert live_ids(settings, RUN_AUDIT_TASK) == set()  # no broker tables yet
    app = Celery("inspect")
    app.conf.update(celery_config(settings))
    audit_id = uuid.uuid4().hex
    app.send_task(RUN_AUDIT_TASK, args=[audit_id], queue=settings.queue_name)
    assert live_ids(settings, RUN_AUDIT_TASK) == {audit_id}
    connection, simple, message = consume_without_ack(app, settings.queue_name, audit_id)
    try:
        # kombu's SQL transport hides a delivered message; a worker that dies with it loses it, and then
        # the audit (or run) is `running` with a stale heartbeat, which the sweeper handles from the database.
        assert live_ids(settings, RUN_AUDIT_TASK) == set()
    finally:
        simple.close()
        connection.release()
