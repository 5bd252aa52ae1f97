"""Rate limit per API key on two real `pruneaudit api` processes sharing Redis (the broker), configured only
through their environment (PRUNEAUDIT_RATE_LIMIT_BURST / _PER_S): the limit holds in total across both; every
limited answer carries RateLimit-Limit / -Remaining / -Reset; past the burst, 429 problem+json with Retry-After;
another key is not affected; health endpoints are exempt; after waiting Retry-After the same key is served again."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.integration.stack import start_api, start_stack

BURST = 3
PER_S = 1.5  # BURST requests per moving window of BURST / PER_S = 2 s: Retry-After is 2 right after the burst


@pytest.fixture(scope="module")
def limited_stack(tmp_path_factory, redis_broker):
    broker_url, prefix = redis_broker
    stack = start_stack(
        tmp_path_factory.mktemp("rate-limit"),
        with_worker=False,
        broker_url=broker_url,
        key_prefix=prefix,
        settings={"PRUNEAUDIT_RATE_LIMIT_BURST": str(BURST), "PRUNEAUDIT_RATE_LIMIT_PER_S": str(PER_S)},
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def second_url(limited_stack) -> str:
    """Another API process of the same stack: same Redis, so the same counts."""
    return start_api(limited_stack, "api-2")


@pytest.fixture
def key(limited_stack) -> str:
    """A key of a new tenant per test, so each test starts with a full bucket whatever ran before."""
    return limited_stack.new_key(f"rate-limit-{uuid.uuid4().hex[:8]}")


def spend_burst(client) -> None:
    for _ in range(BURST):
        response = client.get("/v1/audits")
        assert response.status_code == 200, response.text


def exhaust(client):
    """Requests until the first 429, which must come within the burst and one more (plus slack for refill)."""
    for _ in range(BURST + 2):
        response = client.get("/v1/audits")
        if response.status_code == 429:
            return response
        assert response.status_code == 200, response.text
    raise AssertionError(f"no 429 after {BURST + 2} requests with a burst of {BURST}")


def test_past_the_burst_a_key_gets_429_problem_json_with_retry_after(limited_stack, key):
    with limited_stack.client(key) as client:
        spend_burst(client)
        refused = client.get("/v1/audits")
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 2  # the window, less the time the burst took to send
        assert refused.headers["ratelimit-reset"] == str(retry_after)
        assert (refused.headers["ratelimit-limit"], refused.headers["ratelimit-remaining"]) == (str(BURST), "0")
        problem = refused.json()
        assert problem["type"].endswith("/problems/rate-limited")
        assert problem["status"] == 429 and problem["title"] == "Too many requests"
        assert problem["instance"] == "/v1/audits" and problem["errors"] == []
        assert f"retry after {retry_after} s" in problem["detail"]
        # Any path counts, POSTs too: the limit is per key, not per endpoint.
        assert client.post("/v1/audits", json={}).status_code == 429
        # Hammering while limited does not get requests through.
        assert {client.get("/v1/audits").status_code for _ in range(10)} == {429}


def test_another_key_is_not_affected(limited_stack, key):
    other_key = limited_stack.new_key(f"rate-limit-other-{uuid.uuid4().hex[:8]}")
    with limited_stack.client(key) as client, limited_stack.client(other_key) as other:
        exhaust(client)
        spend_burst(other)  # a full burst of its own, while the first key is limited
        assert other.get("/v1/audits").status_code == 429
        assert client.get("/v1/audits").status_code == 429


def test_health_and_documentation_are_exempt(limited_stack, key):
    with limited_stack.client(key) as client:
        exhaust(client)
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            statuses = {client.get(path).status_code for _ in range(2 * BURST)}
            assert statuses == {200}, (path, statuses)
        assert client.get("/v1/audits").status_code == 429


def test_after_retry_after_the_same_key_is_served_again(limited_stack, key):
    with limited_stack.client(key) as client:
        refused = exhaust(client)
        time.sleep(int(refused.headers["retry-after"]))
        served = client.get("/v1/audits")
        assert served.status_code == 200
        assert 0 <= int(served.headers["ratelimit-remaining"]) < BURST


def test_the_limit_holds_in_total_across_two_api_processes(limited_stack, second_url, key):
    """Requests alternate between the processes: together they serve BURST, then both refuse."""
    with (
        limited_stack.client(key) as first,
        httpx.Client(base_url=second_url, headers={"X-API-Key": key}, timeout=60) as second,
    ):
        answers = [(first if i % 2 == 0 else second).get("/v1/audits") for i in range(BURST + 3)]
        assert [a.status_code for a in answers[:BURST]] == [200] * BURST, [a.text for a in answers]
        # One count: each answer's Remaining is one less than the previous one's, whichever process gave it.
        assert [a.headers["ratelimit-remaining"] for a in answers[:BURST]] == [str(n) for n in range(BURST - 1, -1, -1)]
        assert {a.headers["ratelimit-limit"] for a in answers} == {str(BURST)}
        assert {a.status_code for a in answers[BURST:]} == {429}
        assert all(1 <= int(a.headers["retry-after"]) <= 2 for a in answers[BURST:])
