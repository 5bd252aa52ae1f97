"""Rate limit per client, shared by every API process when the broker is Redis: 429 problem+json with
``Retry-After``, and ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset`` on every limited answer.

Every request except the health and documentation endpoints counts against its client. A client may send at most
``PRUNEAUDIT_RATE_LIMIT_BURST`` requests (default 60) in any window of ``burst / PRUNEAUDIT_RATE_LIMIT_PER_S``
seconds (default 60 / 10 = 6 s, rounded to whole seconds, at least 1): a moving window (the `limits` package), so
the average rate is at most ``per_s`` and a burst at most ``burst``, whenever it starts. Either set to 0 turns the
limit off. A refused request does not count.

Headers (IETF draft-ietf-httpapi-ratelimit-headers, the ``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` form that
most clients and gateways read): the window's quota, what is left of it after this request, and the whole seconds
until the oldest counted request leaves the window (a slot frees). A 429 also carries ``Retry-After``, the same
seconds: a client that waits that long is served.

Where the counts live: in Redis when the broker is Redis (``PRUNEAUDIT_BROKER_URL`` redis:// or rediss://, under
``PRUNEAUDIT_BROKER_KEY_PREFIX``), so N API processes allow the limit in total, not N times it, and a restart
forgets nothing; in the API process's memory otherwise (the embedded SQLite deployment is one host, usually one
process). If Redis does not answer, requests are served unlimited (logged): the limit protects the service, it is
not worth refusing every request over.

The client is the ``X-API-Key`` request header, keyed by its sha256 (the key itself is never stored), or the
client address when the header is absent. The key is not validated here: authentication happens later, in the
app, so a request with a wrong key counts against that wrong key (a client can dodge the limit by inventing keys,
but every such request is then refused by authentication). Behind a proxy the client address is the proxy's unless
uvicorn is told to trust its forwarded headers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

from fastapi import FastAPI
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import problem
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)
API_KEY_HEADER = b"x-api-key"
DOCS_ASSETS_PREFIX = "/docs/assets/"  # the Swagger UI and ReDoc scripts (service/routes/docs.py)
EXEMPT_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
PROBLEM_PREFIX = "/problems/"  # the problem type pages (service/routes/problem_pages.py): documentation


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # whole seconds until the oldest counted request leaves the window (at least 1 when refused)

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }


class RateLimiter:
    """`burst` requests per moving window of `window_s` seconds per identity, counted in `storage`."""

    def __init__(self, burst: int, window_s: int, storage: Storage) -> None:
        if burst < 1 or window_s < 1:
            raise ValueError("a rate limit needs a burst of at least 1 and a window of at least 1 s")
        self.item = RateLimitItemPerSecond(burst, window_s)
        self.window_s = window_s
        self.storage = storage
        self.strategy = MovingWindowRateLimiter(storage)

    @property
    def burst(self) -> int:
        return self.item.amount

    async def hit(self, identity: str) -> Decision:
        allowed = await self.strategy.hit(self.item, identity)
        stats = await self.strategy.get_window_stats(self.item, identity)
        reset_s = max(0, math.ceil(stats.reset_time - time.time()))
        return Decision(allowed, self.burst, stats.remaining, reset_s if allowed else max(1, reset_s))


def window_seconds(per_s: float, burst: int) -> int:
    return max(1, round(burst / per_s))


def limiter_from_settings(settings: Settings) -> RateLimiter | None:
    """None when the limit is off; Redis-backed when the broker is Redis, in memory otherwise."""
    if settings.rate_limit_per_s <= 0 or settings.rate_limit_burst <= 0:
        return None
    broker = settings.resolved_broker_url()
    storage: Storage
    if broker.startswith(("redis://", "rediss://")):
        prefix = f"{settings.broker_key_prefix}pruneaudit-ratelimit"
        storage = RedisStorage(broker, implementation="redispy", key_prefix=prefix, wrap_exceptions=True)
    else:
        storage = MemoryStorage()
    window = window_seconds(settings.rate_limit_per_s, settings.rate_limit_burst)
    return RateLimiter(settings.rate_limit_burst, window, storage)


def client_identity(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == API_KEY_HEADER:
            return "key:" + hashlib.sha256(value).hexdigest()
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


def is_exempt(path: str) -> bool:
    return path in EXEMPT_PATHS or path.startswith((DOCS_ASSETS_PREFIX, PROBLEM_PREFIX))


class RateLimitMiddleware:
    """ASGI middleware: counts each request, adds the RateLimit headers to its answer, and answers 429
    problem+json (``service.problems.problem``) with ``Retry-After`` past the limit. ``limiter`` is built from
    settings when not given; None there means the limit is off."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter | None = None) -> None:
        self.app = app
        self.limiter = limiter or limiter_from_settings(get_settings())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.limiter is None or scope["type"] != "http" or is_exempt(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        try:
            decision = await self.limiter.hit(client_identity(scope))
        except StorageError:
            log.warning("rate limit storage unavailable; serving %s unlimited", scope.get("path"), exc_info=True)
            await self.app(scope, receive, send)
            return
        if decision.allowed:
            await self.app(scope, receive, with_headers(send, decision.headers()))
            return
        response = problem(
            Request(scope),
            429,
            "Too many requests",
            f"rate limit of {self.limiter.burst} requests per {self.limiter.window_s} s per API key exceeded; "
            f"retry after {decision.reset_s} s",
            "rate-limited",
        )
        response.headers.update({**decision.headers(), "Retry-After": str(decision.reset_s)})
        await response(scope, receive, send)


def with_headers(send: Send, headers: dict[str, str]) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message).update(headers)
        await send(message)

    return send_with_headers


def install_rate_limit(app: FastAPI) -> None:
    """Register the middleware (outermost of the app's own, so a limited request costs nothing more); its 429 and
    headers are declared in the OpenAPI document by service/openapi.py."""
    app.add_middleware(RateLimitMiddleware)
