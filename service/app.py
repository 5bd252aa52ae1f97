"""The FastAPI application, assembled: error handlers (`service.problems`), middleware and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from service import metrics
from service.logs import RequestIdMiddleware
from service.metrics import MetricsMiddleware
from service.openapi import install_openapi, operation_id
from service.problems import install_error_handlers
from service.ratelimit import install_rate_limit
from service.routes import audits, catalog, compare, health, problem_pages, schedules, webhooks
from service.routes.docs import install_docs
from service.settings import get_settings
from service.upload_limits import BodyLimitMiddleware


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # Sync handlers run on AnyIO's thread limiter; it matches the connection pool (service/db.py).
    anyio.to_thread.current_default_thread_limiter().total_tokens = get_settings().api_threads
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        docs_url=None,  # served from local assets by service/routes/docs.py
        redoc_url=None,
        title="pruneaudit",
        version="0.1.0",
        description=(
            "Tells a team, before it ships a pruned network, which groups of people the pruning hurts. "
            "Upload a model (safetensors + architecture) and a dataset with group attributes, queue an audit, "
            "read the per-group fairness report."
        ),
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)  # 413 on Content-Length before the body is spooled
    install_rate_limit(app)  # 429 + Retry-After per API key; outermost, before the body limit
    app.add_middleware(MetricsMiddleware)  # counts and times every answer, 429s and 413s too
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries X-Request-ID
    app.include_router(metrics.router)
    app.include_router(health.router)
    app.include_router(catalog.router)
    app.include_router(audits.router)
    app.include_router(compare.router)
    app.include_router(schedules.router)
    app.include_router(webhooks.router)
    app.include_router(problem_pages.router)
    install_docs(app)
    install_openapi(app)
    return app
