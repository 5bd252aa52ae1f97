"""Errors become RFC 9457 problem+json here, in one place: the error hierarchy of `service.errors`, request
validation, Starlette's HTTP errors, database outages (503) and anything unexpected (500)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import DatabaseNotMigrated, PruneauditError
from service.logs import REQUEST_ID_HEADER, current_request_id
from service.problem_types import problem_type_uri

log = logging.getLogger(__name__)
PROBLEM_MEDIA_TYPE = "application/problem+json"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


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


def _path_names_nothing(errors: Sequence[dict]) -> str | None:
    """'audit <value>' when a path id is malformed: such a URL names no resource, so it answers 404 exactly as a
    missing id does (the path parameters are all ids; see service.schemas.common.PathId)."""
    for error in errors:
        location = error.get("loc", ())
        if len(location) == 2 and location[0] == "path":
            return f"{str(location[1]).removesuffix('_id')} {error.get('input')}"
    return None


def _schema_missing(exc: Exception) -> bool:
    """A table is missing: the database was never migrated (PostgreSQL's undefined_table, SQLite's message)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == "42P01" or "no such table" in str(orig)


def allowed_methods(request: Request, exc: StarletteHTTPException) -> str:
    """The Allow header of a 405 (RFC 9110 §15.5.6): the methods of every operation on the path. Starlette's own
    (kept, for routes outside the OpenAPI document) names only the first route that matched, though GET, PATCH and
    DELETE of one path are separate routes."""
    methods = {m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()}
    for template, verbs in _operations(request.app):
        if template.fullmatch(request.url.path):
            methods |= verbs
    return ", ".join(sorted(methods))


def _operations(app: FastAPI) -> list[tuple[re.Pattern, set[str]]]:
    """Each path of the OpenAPI document as a pattern, with its methods; made once per app."""
    if not hasattr(app.state, "operations"):
        app.state.operations = [
            (
                re.compile("[^/]+".join(re.escape(part) for part in re.split(r"\{[^}/]+\}", path))),
                {method.upper() for method in item if method in HTTP_METHODS},
            )
            for path, item in app.openapi()["paths"].items()
        ]
    return app.state.operations


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PruneauditError)
    async def _pruneaudit_error(request: Request, exc: PruneauditError) -> JSONResponse:
        response = problem(request, exc.status, exc.title, exc.detail, exc.slug, exc.errors)
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if missing := _path_names_nothing(exc.errors()):
            return problem(request, 404, "Not found", f"{missing} does not exist", "not-found")
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return problem(request, 422, "Invalid input", _validation_detail(errors), "invalid-input", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = problem(request, exc.status_code, str(exc.detail), str(exc.detail), f"http-{exc.status_code}")
        if exc.status_code == 405:
            response.headers["Allow"] = allowed_methods(request, exc)
        return response

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeoutError)
    async def _database_error(request: Request, exc: Exception) -> JSONResponse:
        # Connection-level failures (database down, connection dropped, pool exhausted, a connect or statement
        # timeout: service/db.py) and a schema not yet migrated are the service's state, not the request's fault:
        # 503 + Retry-After, so clients and load balancers retry.
        if _schema_missing(exc):
            not_migrated = DatabaseNotMigrated("the database has no schema yet; run `pruneaudit migrate`")
            return await _pruneaudit_error(request, not_migrated)
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
            "the database cannot be reached or did not answer in time; retry shortly (with an Idempotency-Key, "
            "retrying POST /v1/audits never makes a second audit)",
            "database-unavailable",
        )
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        response = problem(
            request, 500, "Internal error", "an unexpected error occurred; it has been logged", "internal"
        )
        # Answered by Starlette's outermost middleware, outside RequestIdMiddleware: the id the log line carries.
        if (request_id := current_request_id()) is not None:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
