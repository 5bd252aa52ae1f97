"""The per-key token bucket (service/ratelimit.py) on an injected clock: burst, refill, the Retry-After value,
eviction of idle buckets; and the middleware's 429 answer on a small ASGI app."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service.ratelimit import RateLimitMiddleware, TokenBuckets, client_identity


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_a_fresh_key_gets_exactly_the_burst_then_429():
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=2, burst=5, clock=clock)
    assert [buckets.take("a").allowed for _ in range(5)] == [True] * 5
    refused = buckets.take("a")
    assert not refused.allowed
    # Empty bucket, 2 tokens/s: one token in 0.5 s, rounded up to whole seconds.
    assert refused.retry_after_s == 1


def test_refill_is_rate_times_elapsed_capped_at_the_burst():
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=2, burst=5, clock=clock)
    for _ in range(5):
        assert buckets.take("a").allowed
    clock.advance(1.0)  # 2 tokens back
    assert [buckets.take("a").allowed for _ in range(3)] == [True, True, False]
    clock.advance(3600)  # an hour idle refills to the burst, not beyond
    assert sum(buckets.take("a").allowed for _ in range(20)) == 5


def test_refused_requests_do_not_lose_refill_time():
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=1, burst=1, clock=clock)
    assert buckets.take("a").allowed
    for _ in range(4):  # hammering while empty does not push the next token further away
        clock.advance(0.2)
        assert not buckets.take("a").allowed
    clock.advance(0.2)  # 1.0 s after the first request: one token
    assert buckets.take("a").allowed


@pytest.mark.parametrize(
    ("rate", "burst", "elapsed", "expected"),
    [
        (10, 60, 0.0, 1),  # the default: 0.1 s to the next token → 1 s (whole seconds, never 0)
        (0.1, 1, 0.0, 10),  # one request every 10 s
        (0.1, 1, 4.5, 6),  # 5.5 s left → 6
        (0.25, 2, 1.0, 3),  # 0.25 of a token after 1 s; 0.75 missing at 0.25/s → 3 s
    ],
)
def test_retry_after_is_the_wait_until_the_next_token_rounded_up(rate, burst, elapsed, expected):
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=rate, burst=burst, clock=clock)
    while buckets.take("a").allowed:
        pass
    clock.advance(elapsed)
    decision = buckets.take("a")
    assert not decision.allowed and decision.retry_after_s == expected
    clock.advance(decision.retry_after_s)  # waiting exactly Retry-After is enough
    assert buckets.take("a").allowed


def test_keys_have_separate_buckets():
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=1, burst=2, clock=clock)
    assert buckets.take("a").allowed and buckets.take("a").allowed
    assert not buckets.take("a").allowed
    assert buckets.take("b").allowed and buckets.take("b").allowed


def test_idle_buckets_are_evicted_once_they_would_be_full_again():
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=2, burst=4, clock=clock)  # empty → full in 2 s
    for identity in range(100):
        buckets.take(f"client-{identity}")
    assert len(buckets) == 100
    clock.advance(1.0)
    buckets.take("late")
    assert len(buckets) == 101  # not yet full again: their state still matters
    clock.advance(1.0)
    buckets.take("later")
    assert len(buckets) == 2  # the 100 are full again (same as new) and gone; "late" 1 s old stays
    # A client whose bucket was evicted is treated exactly as it would have been: full again.
    assert sum(buckets.take("client-0").allowed for _ in range(10)) == 4


def test_the_table_is_capped_by_dropping_the_least_recently_used():
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=1, burst=1, clock=clock, max_buckets=3)
    for identity in "abcd":
        assert buckets.take(identity).allowed
    assert len(buckets) == 3
    assert not buckets.take("d").allowed  # the newest are kept ...
    assert buckets.take("a").allowed  # ... the oldest, dropped, starts over (lenient, never stricter)


def test_zero_rate_or_burst_is_refused_by_the_bucket():
    with pytest.raises(ValueError):
        TokenBuckets(rate_per_s=0, burst=5)
    with pytest.raises(ValueError):
        TokenBuckets(rate_per_s=1, burst=0)


def test_identity_is_the_sha256_of_the_api_key_else_the_client_address():
    key = b"pa_secret-key"
    with_key = client_identity({"headers": [(b"x-api-key", key)], "client": ("10.0.0.1", 5555)})
    assert with_key == "key:" + hashlib.sha256(key).hexdigest()
    assert "secret" not in with_key
    assert client_identity({"headers": [], "client": ("10.0.0.1", 5555)}) == "addr:10.0.0.1"


def _limited_app(clock: Clock) -> Starlette:
    async def hello(_request):
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route(path, hello) for path in ("/v1/audits", "/healthz", "/readyz", "/openapi.json")])
    app.add_middleware(RateLimitMiddleware, buckets=TokenBuckets(rate_per_s=0.5, burst=2, clock=clock))
    return app


def test_the_middleware_answers_429_problem_json_with_retry_after():
    clock = Clock()

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=_limited_app(clock))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = {"X-API-Key": "first"}
            assert [(await client.get("/v1/audits", headers=first)).status_code for _ in range(2)] == [200, 200]
            refused = await client.get("/v1/audits", headers=first)
            assert refused.status_code == 429
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["retry-after"] == "2"
            body = refused.json()
            assert body["type"] == "https://pruneaudit.dev/problems/rate-limited"
            assert body["status"] == 429 and body["title"] == "Too many requests"
            assert body["instance"] == "/v1/audits" and body["errors"] == []
            assert "retry after 2 s" in body["detail"]
            # Another key, and requests without one (keyed by address), have their own buckets.
            assert (await client.get("/v1/audits", headers={"X-API-Key": "second"})).status_code == 200
            assert (await client.get("/v1/audits")).status_code == 200
            # Health and the document are never limited.
            for path in ("/healthz", "/readyz", "/openapi.json"):
                for _ in range(5):
                    assert (await client.get(path, headers=first)).status_code == 200
            clock.advance(2)
            assert (await client.get("/v1/audits", headers=first)).status_code == 200

    asyncio.run(scenario())


def test_the_openapi_document_declares_429_on_limited_operations_only():
    from service.app import create_app

    document = create_app().openapi()
    audits = document["paths"]["/v1/audits"]["post"]["responses"]["429"]
    assert "Retry-After" in audits["headers"]
    assert audits["content"]["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert "429" not in document["paths"]["/healthz"]["get"]["responses"]
    assert "429" not in document["paths"]["/readyz"]["get"]["responses"]
