"""The OpenAPI document as client generators read it, shaped in one place: every error response is RFC 9457
problem+json (service/problems.py) typed by the `Problem` schema under `application/problem+json` alone; the
rate limit's 429 (with Retry-After) and the 500 and 503 every operation can answer are declared; operation ids are
the route functions' names (`create_audit`, `read_report`: short, and stable while the names are); uploaded files
carry `format: binary` besides OpenAPI 3.1's `contentMediaType`, which generators such as openapi-python-client
read as a plain string otherwise."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.problems import PROBLEM_MEDIA_TYPE
from service.ratelimit import is_exempt

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
# service/ratelimit.py: on every rate-limited answer (declared on the 429, where they are always sent).
RATE_LIMIT_HEADERS = {
    "RateLimit-Limit": {"description": "Requests allowed per window", "schema": {"type": "integer"}},
    "RateLimit-Remaining": {"description": "Requests left in the window", "schema": {"type": "integer"}},
    "RateLimit-Reset": {"description": "Seconds until a request leaves the window", "schema": {"type": "integer"}},
}
# Answered by any operation, whatever its own responses: the limiter, an unexpected error, a database or blob
# store that is down.
COMMON_ERRORS: dict[str, dict[str, Any]] = {
    "429": {
        "description": "Too many requests: this API key's rate limit is exhausted",
        "headers": {"Retry-After": RETRY_AFTER, **RATE_LIMIT_HEADERS},
    },
    "500": {"description": "Internal error (a bug: the problem's detail names the request)"},
    "503": {
        "description": "Service unavailable: the database or the blob store does not answer, or an upload found no "
        "room to be decoded (max_decoding_bytes); retry after Retry-After",
        "headers": {"Retry-After": RETRY_AFTER},
    },
}


def operation_id(route: APIRoute) -> str:
    return route.name


def _typed_errors(operation: dict[str, Any], limited: bool) -> None:
    responses = operation.setdefault("responses", {})
    for code, declared in COMMON_ERRORS.items():
        if code != "429" or limited:
            responses.setdefault(code, dict(declared))
    for code, response in responses.items():
        if code[0] in "45":
            response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}


def _binary_uploads(schemas: dict[str, Any]) -> None:
    for schema in schemas.values():
        for field in schema.get("properties", {}).values():
            if field.get("contentMediaType") == "application/octet-stream":
                field.setdefault("format", "binary")


def install_openapi(app: FastAPI) -> None:
    """Replace the app's document builder by one that shapes the errors; create the app with
    generate_unique_id_function=operation_id."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            for path, operations in document.get("paths", {}).items():
                for operation in operations.values():
                    _typed_errors(operation, limited=not is_exempt(path))
            _binary_uploads(document.get("components", {}).get("schemas", {}))
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
