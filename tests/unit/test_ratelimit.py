"""The rate limiter (service/ratelimit.py) on the `limits` package's in-memory storage: exactly `burst` requests
per moving window, refused ones not counted, the RateLimit headers and Retry-After; the window from the settings;
and the middleware's answers on a small ASGI app."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
from limits.aio.storage import MemoryStorage
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service.ratelimit import RateLimiter, RateLimitMiddleware, client_identity, limiter_from_settings, window_seconds
from service.settings import Settings


def test_a_fresh_key_gets_exactly_the_burst_then_refusals_that_do_not_count():
    async def scenario() -> None:
        limiter = RateLimiter(burst=3, window_s=5, storage=MemoryStorage())
        decisions = [await limiter.hit("a") for _ in range(6)]
        assert [d.allowed for d in decisions] == [True, True, True, False, False, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0, 0]
        assert {d.limit for d in decisions} == {3}
        assert all(1 <= d.reset_s <= 5 for d in decisions[3:])
        assert (await limiter.hit("b")).allowed  # another key counts apart

    asyncio.run(scenario())


@pytest.mark.parametrize(("per_s", "burst", "window"), [(10, 60, 6), (0.5, 3, 6), (1.5, 3, 2), (100, 1, 1)])
def test_the_window_is_burst_over_rate_in_whole_seconds(per_s, burst, window):
    assert window_seconds(per_s, burst) == window


def test_settings_choose_redis_storage_for_a_redis_broker_and_memory_otherwise(tmp_path):
    def limiter(**settings):
        defaults = {"var_dir": tmp_path, "broker_url": None, "rate_limit_per_s": 10, "rate_limit_burst": 60}
        return limiter_from_settings(Settings(**{**defaults, **settings}))

    redis_backed = limiter(broker_url="redis://127.0.0.1:6379/0")
    assert redis_backed is not None and type(redis_backed.storage).__name__ == "RedisStorage"
    embedded = limiter()
    assert embedded is not None and isinstance(embedded.storage, MemoryStorage)
    assert (embedded.burst, embedded.window_s) == (60, 6)
    assert limiter(rate_limit_per_s=0) is None and limiter(rate_limit_burst=0) is None


def test_identity_is_the_sha256_of_the_api_key_else_the_client_address():
    key = b"pa_secret-key"
    with_key = client_identity({"headers": [(b"x-api-key", key)], "client": ("10.0.0.1", 5555)})
    assert with_key == "key:" + hashlib.sha256(key).hexdigest()
    assert "secret" not in with_key
    assert client_identity({"headers": [], "client": ("10.0.0.1", 5555)}) == "addr:10.0.0.1"


def _limited_app() -> Starlette:
    async def hello(_request):
        return PlainTextResponse("hello")

    paths = ("/v1/audits", "/healthz", "/readyz", "/openapi.json", "/problems/not-found")
    app = Starlette(routes=[Route(path, hello) for path in paths])
    app.add_middleware(RateLimitMiddleware, limiter=RateLimiter(burst=2, window_s=2, storage=MemoryStorage()))
    return app


def test_the_middleware_adds_ratelimit_headers_and_answers_429_problem_json_with_retry_after():
    async def scenario() -> None:
        transport = httpx.ASGITransport(app=_limited_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = {"X-API-Key": "first"}
            served = [await client.get("/v1/audits", headers=first) for _ in range(2)]
            assert [r.status_code for r in served] == [200, 200]
            assert [r.headers["ratelimit-remaining"] for r in served] == ["1", "0"]
            assert {r.headers["ratelimit-limit"] for r in served} == {"2"}
            refused = await client.get("/v1/audits", headers=first)
            assert refused.status_code == 429
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["retry-after"] == refused.headers["ratelimit-reset"] == "2"
            assert refused.headers["ratelimit-remaining"] == "0"
            body = refused.json()
            assert body["type"] == "http://test/problems/rate-limited"
            assert body["status"] == 429 and body["title"] == "Too many requests"
            assert body["instance"] == "/v1/audits" and body["errors"] == []
            assert "retry after 2 s" in body["detail"]
            # Another key, and requests without one (keyed by address), count apart.
            assert (await client.get("/v1/audits", headers={"X-API-Key": "second"})).status_code == 200
            assert (await client.get("/v1/audits")).status_code == 200
            # Health, the document and the problem pages are never limited, and carry no RateLimit headers.
            for path in ("/healthz", "/readyz", "/openapi.json", "/problems/not-found"):
                for _ in range(5):
                    answer = await client.get(path, headers=first)
                    assert answer.status_code == 200 and "ratelimit-limit" not in answer.headers

    asyncio.run(scenario())


def test_the_openapi_document_declares_429_on_limited_operations_only():
    from service.app import create_app

    document = create_app().openapi()
    audits = document["paths"]["/v1/audits"]["post"]["responses"]["429"]
    assert {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= set(audits["headers"])
    assert audits["content"]["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert "429" not in document["paths"]["/healthz"]["get"]["responses"]
    assert "429" not in document["paths"]["/readyz"]["get"]["responses"]
