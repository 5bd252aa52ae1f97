"""Errors become RFC 9457 problem+json here, in one place: the error hierarchy of `service.errors`, request
validation, Starlette's HTTP errors, database outages (503) and anything unexpected (500)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import PruneauditError
from service.problem_types import problem_type_uri

log = logging.getLogger(__name__)
PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem_body(
    status: int, title: str, detail: str, type_uri: str, instance: str, errors: list | None = None
) -> dict:
    """`type_uri`: service.problem_types.problem_type_uri, a page on the API describing the problem."""
    return {
        "type": type_uri,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        "errors": errors or [],
    }


def problem(
    request: Request, status: int, title: str, detail: str, slug: str, errors: list | None = None
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, title, detail, problem_type_uri(request, slug), request.url.path, errors),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def _validation_detail(errors: list[dict]) -> str:
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where}: {first.get('msg')}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PruneauditError)
    async def _pruneaudit_error(request: Request, exc: PruneauditError) -> JSONResponse:
        return problem(request, exc.status, exc.title, exc.detail, exc.slug, exc.errors)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return problem(request, 422, "Invalid input", _validation_detail(errors), "invalid-input", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(request, exc.status_code, str(exc.detail), str(exc.detail), f"http-{exc.status_code}")

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeoutError)
    async def _database_error(request: Request, exc: Exception) -> JSONResponse:
        # Connection-level failures (database down, connection dropped, pool exhausted) are the service's
        # state, not the request's fault: 503 + Retry-After, so clients and load balancers retry.
        unavailable = isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError)) or getattr(
            exc, "connection_invalidated", False
        )
        if not unavailable:
            return await _unexpected(request, exc)
        log.warning("database unavailable on %s: %s", request.url.path, str(exc).splitlines()[0])
        response = problem(
            request,
            503,
            "Database unavailable",
            "the database cannot be reached right now; retry shortly (with an Idempotency-Key, "
            "retrying POST /v1/audits never makes a second audit)",
            "database-unavailable",
        )
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem(request, 500, "Internal error", "an unexpected error occurred; it has been logged", "internal")
