"""Issue #16's black-box probes, on real API processes and PostgreSQL: each answers a 4xx or a 503 problem, never a
500 or a hang, and stores nothing; slow clients are cut off by the server's own deadlines (short ones, set here)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import throwaway_postgres
from tests.integration.stack import (
    REPO,
    Stack,
    assert_problem,
    free_port,
    stack_env,
    start_process,
    start_stack,
    wait_until_answering,
)

FAST_LIMITS = {
    "PRUNEAUDIT_DATABASE_CONNECT_TIMEOUT_S": "2",  # libpq's least
    "PRUNEAUDIT_DATABASE_STATEMENT_TIMEOUT_S": "2",
    "PRUNEAUDIT_HTTP_HEADER_TIMEOUT_S": "1",
    "PRUNEAUDIT_BODY_READ_TIMEOUT_S": "1",
}
SOME_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, postgres_url):
    stack = start_stack(
        tmp_path_factory.mktemp("hardening"), with_worker=False, database_url=postgres_url, settings=FAST_LIMITS
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack):
    with stack.client() as client:
        yield client


def api_only(var_dir: Path, database_url: str) -> Stack:
    """`pruneaudit api` alone, nothing migrated first: it must start whatever state the database is in."""
    var_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**stack_env(var_dir, database_url=database_url, port=port), **FAST_LIMITS}
    api = Stack(url=f"http://127.0.0.1:{port}", env=env, var_dir=var_dir)
    start_process(api, "api", ["api", "--port", str(port)])
    wait_until_answering(api, "api", api.url, "/healthz")
    return api


def stored_blobs(stack: Stack) -> list[str]:
    return sorted(p.name for p in (stack.var_dir / "blobs").rglob("*") if p.is_file())


def totals(client: httpx.Client) -> tuple[int, int, int]:
    return tuple(client.get(f"/v1/{kind}").json()["total"] for kind in ("models", "datasets", "audits"))


def test_share_token_and_api_key_with_non_ascii_text_are_refused_not_500(stack):
    # No API key: the share-token path is reachable by anyone.
    response = httpx.get(f"{stack.url}/v1/audits/{SOME_ID}/report.html?token=%C3%80")
    assert_problem(response, 404, f"audit {SOME_ID} does not exist")
    response = httpx.get(f"{stack.url}/v1/models", headers={"X-API-Key": "pa_\xc0\xc0_s\xe9cret".encode("latin-1")})
    assert_problem(response, 401, "not valid")


def test_nul_and_malformed_ids_are_404_in_paths_and_422_elsewhere_and_nothing_is_stored(stack, client, digits_case):
    model = digits_case.upload_model(client).json()
    dataset = digits_case.upload_dataset(client).json()
    before, blobs = totals(client), stored_blobs(stack)
    for method, path in [
        ("GET", "/v1/models/a%00b"),
        ("GET", "/v1/datasets/a%00b"),
        ("GET", "/v1/audits/a%00b"),
        ("GET", "/v1/audits/a%00b/report.csv"),
        ("GET", f"/v1/audits/{SOME_ID}/runs/b%00/weights"),
        ("POST", "/v1/audits/a%00b/cancel"),
        ("GET", "/v1/schedules/a%00b"),
        ("DELETE", "/v1/webhooks/a%00b"),
    ]:
        assert_problem(client.request(method, path), 404, "does not exist")
    assert_problem(client.get("/v1/compare", params={"audits": f"a\x00,{SOME_ID}"}), 422, "not an audit id")
    assert_problem(client.get("/v1/audits", params={"model_id": "a\x00"}), 422, "model_id")
    assert_problem(client.get("/v1/models", params={"name": "a\x00"}), 422, "name")
    spec = {"model_id": model["id"], "dataset_id": dataset["id"], "group_by": ["digit"]}
    for field in ("model_id", "dataset_id", "train_dataset_id"):
        assert_problem(client.post("/v1/audits", json={**spec, field: "a\x00b"}), 422, field)
    assert_problem(client.post("/v1/audits", json={**spec, "model": {"name": "a\x00"}}), 422, "model.name")
    named = {"weights": ("m.safetensors", digits_case.weights)}
    response = client.post("/v1/models", files=named, data={"architecture": "{}", "name": "a\x00b"})
    assert_problem(response, 422, "name")
    assert totals(client) == before and stored_blobs(stack) == blobs


def test_nul_in_a_csv_group_value_is_refused_at_upload(stack, client):
    before, blobs = totals(client), stored_blobs(stack)
    csv = b"f1,f2,label,sex\n1.0,2.0,0,F\n3.0,4.0,1,M\x00x\n"
    response = client.post("/v1/datasets", files={"file": ("d.csv", csv)}, data={"label": "label", "groups": "sex"})
    assert_problem(response, 422, "group attribute 'sex'", "NUL")
    assert totals(client) == before and stored_blobs(stack) == blobs


def test_405_names_every_allowed_method(client):
    response = client.put(f"/v1/schedules/{SOME_ID}")
    assert_problem(response, 405)
    assert response.headers["allow"] == "DELETE, GET, PATCH"
    assert client.delete("/v1/architectures").headers["allow"] == "GET"


def test_statement_timeout_answers_503_while_a_lock_is_held(stack, client, postgres_url):
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as locker:
        locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")  # every request's key lookup waits
        started = time.monotonic()
        response = client.get("/v1/models")
        waited = time.monotonic() - started
    assert_problem(response, 503, "did not answer in time")
    assert response.headers["retry-after"] == "5" and waited < 10
    assert client.get("/v1/models").status_code == 200  # the lock is gone: served again


def test_database_that_never_answers_is_503_within_the_connect_timeout(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        api = api_only(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/none")
        try:
            for path, headers in (("/readyz", {}), ("/v1/models", {"X-API-Key": f"pa_{SOME_ID[:16]}_secret"})):
                started = time.monotonic()
                response = httpx.get(api.url + path, headers=headers, timeout=30)
                assert_problem(response, 503, "did not answer in time")
                assert response.headers["retry-after"] == "5" and time.monotonic() - started < 10
        finally:
            api.stop()


def test_api_starts_without_migrating_and_answers_503_until_the_schema_is_there(tmp_path):
    with throwaway_postgres("pruneaudit_unmigrated") as database_url:
        api = api_only(tmp_path, database_url)
        try:
            response = httpx.get(api.url + "/readyz")
            assert_problem(response, 503, "pruneaudit migrate")
            assert response.headers["retry-after"] == "5"
            response = httpx.get(api.url + "/v1/models", headers={"X-API-Key": f"pa_{SOME_ID[:16]}_secret"})
            assert_problem(response, 503, "pruneaudit migrate")
            migrate = [sys.executable, "-m", "service.cli", "migrate"]
            subprocess.run(migrate, env=api.env, cwd=REPO, check=True, capture_output=True)
            assert httpx.get(api.url + "/readyz").status_code == 200
            assert "Traceback" not in api.log("api")
        finally:
            api.stop()


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_slow_headers_and_slow_bodies_are_cut_off(stack):
    address = ("127.0.0.1", int(stack.url.rsplit(":", 1)[1]))
    slow_headers = [socket.create_connection(address, timeout=10) for _ in range(100)]
    for sock in slow_headers:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: pruneaudit\r\n")  # the headers never end
    slow_bodies = [socket.create_connection(address, timeout=10) for _ in range(10)]
    for sock in slow_bodies:
        sock.sendall(
            b"POST /v1/datasets HTTP/1.1\r\nHost: pruneaudit\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"  # then nothing more of the body
        )
    started = time.monotonic()
    try:
        assert all(read_until_closed(sock) == b"" for sock in slow_headers)  # closed, unanswered
        for sock in slow_bodies:
            answer = read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408") and b"request-timeout" in answer, answer[:300]
    finally:
        for sock in slow_headers + slow_bodies:
            sock.close()
    assert time.monotonic() - started < 8  # about the 1 s deadlines, far from the 10 s socket timeout
    assert httpx.get(stack.url + "/healthz").status_code == 200
