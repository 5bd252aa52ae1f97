"""Crash safety (issue #7) on real processes, real Redis and real PostgreSQL: a worker killed with -9 mid-audit,
one that keeps vanishing, a worker child over its memory cap, Redis restarted with audits queued, and
PostgreSQL cut off under the API. Recovery settings are shortened through the environment so this runs in
seconds; the sweeper runs as `pruneaudit sweeper`, exactly as deployed."""

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


def submit(client: httpx.Client, uploads: Uploads, *, epochs: int | None = None) -> str:
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
            "pruning": {"ratios": [0.5], "methods": [method]},
            "diagnostics": {"curvature": "off"},
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


def fine_tuning(client: httpx.Client, audit_id: str, attempt: int) -> bool:
    audit = client.get(f"/v1/audits/{audit_id}").json()
    return (
        audit["status"] == "running" and audit["attempts"] == attempt and "epoch" in (audit["progress_message"] or "")
    )


def stored_run_count(database: str, audit_id: str) -> int:
    return database_rows(database, "SELECT count(*) FROM runs WHERE audit_id = %s", audit_id)[0][0]


@pytest.mark.services
def test_worker_killed_mid_audit_is_recovered_by_a_new_worker(crash_stack, crash_database, uploads):
    """kill -9 of the worker and its child while an audit fine-tunes: the row is left `running` with a
    stale heartbeat; the sweeper re-queues it and the next worker completes it, with one set of runs."""
    with crash_stack.client() as client:
        audit_id = submit(client, uploads, epochs=SLOW_EPOCHS)
        first = start_worker(crash_stack, "worker-killed")
        try:
            wait_until(lambda: fine_tuning(client, audit_id, 1), 120, "the first attempt to fine-tune")
        finally:
            kill_hard(first)
        assert client.get(f"/v1/audits/{audit_id}").json()["status"] == "running"  # orphaned, for now
        second = start_worker(crash_stack, "worker-after-kill")
        try:
            audit = wait_for_audit(client, audit_id, timeout_s=180)
        finally:
            stop_gently(second)
    assert audit["status"] == "succeeded", (audit, crash_stack.log("worker-after-kill"))
    assert audit["attempts"] == 2 and audit["error"] is None
    assert stored_run_count(crash_database, audit_id) == 2  # dense + one pruned run, stored once
    assert f"audit {audit_id}" in crash_stack.log("sweeper")


@pytest.mark.services
def test_audit_whose_worker_keeps_vanishing_fails_at_the_attempt_cap(crash_stack, crash_database, uploads):
    with crash_stack.client() as client:
        audit_id = submit(client, uploads, epochs=10 * SLOW_EPOCHS)
        for attempt in (1, 2):  # PRUNEAUDIT_MAX_ATTEMPTS=2
            worker = start_worker(crash_stack, f"worker-vanishing-{attempt}")
            try:
                wait_until(
                    lambda attempt=attempt: fine_tuning(client, audit_id, attempt),
                    120,
                    f"attempt {attempt} to fine-tune",
                )
            finally:
                kill_hard(worker)
        audit = wait_for_audit(client, audit_id, timeout_s=60)
    assert audit["status"] == "failed", audit
    assert audit["attempts"] == 2
    assert "vanished 2 times" in audit["error"] and "giving up after 2 attempts" in audit["error"]
    assert stored_run_count(crash_database, audit_id) == 0


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
    from service.recovery import audit_ids_in

    carried = Counter(audit_id for raw in server.client().lrange(queue, 0, -1) for audit_id in audit_ids_in([raw]))
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

        own_redis.kill()
        own_redis.start()
        assert own_redis.client().llen(queue) == 0  # without persistence, every message is gone
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
        assert stored_run_count(crash_database, audit["id"]) == 2
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

    from service.queue import RUN_AUDIT_TASK, celery_config
    from service.recovery import live_audit_ids
    from service.settings import Settings

    url, prefix = redis_broker
    settings = Settings(broker_url=url, broker_key_prefix=prefix, queue_name=f"inspect-{uuid.uuid4().hex[:8]}")
    app = Celery("inspect")
    app.conf.update(celery_config(settings))
    audit_id = uuid.uuid4().hex
    assert audit_id not in live_audit_ids(settings)
    app.send_task(RUN_AUDIT_TASK, args=[audit_id], queue=settings.queue_name)
    assert audit_id in live_audit_ids(settings)  # waiting in the queue's list
    connection, simple, message = consume_without_ack(app, settings.queue_name, audit_id)
    try:
        assert audit_id in live_audit_ids(settings)  # delivered, not acked: a worker holds it
        message.ack()
        assert audit_id not in live_audit_ids(settings)
    finally:
        simple.close()
        connection.release()


def test_sweeper_sees_waiting_messages_in_the_embedded_sqlite_broker(tmp_path):
    from celery import Celery

    from service.queue import RUN_AUDIT_TASK, celery_config
    from service.recovery import live_audit_ids
    from service.settings import Settings

    settings = Settings(
        var_dir=tmp_path, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}", queue_name="inspect"
    )
    assert live_audit_ids(settings) == set()  # no broker tables yet
    app = Celery("inspect")
    app.conf.update(celery_config(settings))
    audit_id = uuid.uuid4().hex
    app.send_task(RUN_AUDIT_TASK, args=[audit_id], queue=settings.queue_name)
    assert live_audit_ids(settings) == {audit_id}
    connection, simple, message = consume_without_ack(app, settings.queue_name, audit_id)
    try:
        # kombu's SQL transport hides a delivered message; a worker that dies with it loses it, and then
        # the audit is `running` with a stale heartbeat, which the sweeper handles from the database.
        assert live_audit_ids(settings) == set()
    finally:
        simple.close()
        connection.release()
