"""Rate limit per client: a token bucket per API key, answered 429 problem+json with ``Retry-After``.

Every request except the health and documentation endpoints takes one token from its client's bucket. A
bucket holds at most ``PRUNEAUDIT_RATE_LIMIT_BURST`` tokens (default 60) and refills at
``PRUNEAUDIT_RATE_LIMIT_PER_S`` tokens a second (default 10); either set to 0 turns the limit off. An empty
bucket answers 429 with ``Retry-After``: the whole seconds until the bucket holds a token again, so a client
that waits that long is served.

The client is the ``X-API-Key`` request header, keyed by its sha256 (the key itself is never kept), or the
client address when the header is absent. The key is not validated here: authentication happens later, in
the app, so a request with a wrong key is counted against that wrong key's bucket (a client can dodge the
limit by inventing keys, but every such request is then refused by authentication).

Limits: the buckets live in the API process's memory. With several API processes (uvicorn workers, replicas
behind a load balancer) each keeps its own buckets, so a key gets up to N times the limit across N processes,
and a restart forgets them. Behind a proxy the client address is the proxy's unless uvicorn is told to
trust its forwarded headers. Memory is bounded: a bucket that has been idle long enough to be full again is
indistinguishable from a new one and is dropped, and at most ``MAX_BUCKETS`` are kept (beyond that the
least recently used is dropped early, which can only make the limit more lenient for that client).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.problems import problem
from service.settings import get_settings

API_KEY_HEADER = b"x-api-key"
DOCS_ASSETS_PREFIX = "/docs/assets/"  # the Swagger UI and ReDoc scripts (service/routes/docs.py)
EXEMPT_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
MAX_BUCKETS = 100_000


@dataclass
class Decision:
    allowed: bool
    retry_after_s: int = 0  # whole seconds until a token is available again; 0 when allowed


class TokenBuckets:
    """One token bucket per client identity, least recently used first, with an injectable clock."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive refill rate and a burst of at least 1")
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.clock = clock
        self.max_buckets = max_buckets
        # Seconds an untouched bucket takes to refill from empty: after that it equals a fresh one.
        self.idle_after_s = self.burst / self.rate
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # identity -> (tokens, at)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, identity: str) -> Decision:
        with self._lock:
            now = self.clock()
            state = self._buckets.pop(identity, None)
            self._evict(now)
            tokens, at = state or (self.burst, now)
            tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[identity] = (tokens - 1.0, now)
                return Decision(True)
            self._buckets[identity] = (tokens, now)
            return Decision(False, max(1, math.ceil((1.0 - tokens) / self.rate)))

    def _evict(self, now: float) -> None:
        # Most recently used last, so the idle ones are at the front: amortized O(1) per request.
        buckets = self._buckets
        while buckets:
            identity, (_tokens, at) = next(iter(buckets.items()))
            if now - at < self.idle_after_s and len(buckets) < self.max_buckets:
                break
            del buckets[identity]


def client_identity(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == API_KEY_HEADER:
            return "key:" + hashlib.sha256(value).hexdigest()
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


def is_exempt(path: str) -> bool:
    return path in EXEMPT_PATHS or path.startswith(DOCS_ASSETS_PREFIX)


class RateLimitMiddleware:
    """ASGI middleware: 429 problem+json (``service.problems.problem``) with ``Retry-After`` once a client's
    bucket is empty. ``buckets`` is built from settings when not given; None there means the limit is off."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets | None = None) -> None:
        self.app = app
        if buckets is None:
            settings = get_settings()
            if settings.rate_limit_per_s > 0 and settings.rate_limit_burst > 0:
                buckets = TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst)
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.buckets is None or scope["type"] != "http" or is_exempt(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        decision = self.buckets.take(client_identity(scope))
        if decision.allowed:
            await self.app(scope, receive, send)
            return
        response = problem(
            Request(scope),
            429,
            "Too many requests",
            f"rate limit of {self.buckets.rate:g} requests/s (bursts of {self.buckets.burst:g}) per "
            f"API key exceeded; retry after {decision.retry_after_s} s",
            "rate-limited",
        )
        response.headers["Retry-After"] = str(decision.retry_after_s)
        await response(scope, receive, send)


def install_rate_limit(app: FastAPI) -> None:
    """Register the middleware (outermost of the app's own, so a limited request costs nothing more); its 429 is
    declared in the OpenAPI document by service/openapi.py."""
    app.add_middleware(RateLimitMiddleware)
