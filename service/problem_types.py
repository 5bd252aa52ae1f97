"""Every problem type the API answers with, described once: its RFC 9457 `type` is a URI on the API itself
(`/problems/<slug>`, under PRUNEAUDIT_PUBLIC_URL when set, else the address the request came to), and that URI
answers with a page saying what the problem means and what to do (service/routes/problem_pages.py)."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from starlette.requests import HTTPConnection

from service.settings import get_settings

PROBLEMS_PATH = "/problems/"
HTTP_PREFIX = "http-"  # Starlette's own errors (unknown route, wrong method, malformed multipart): http-<status>


@dataclass(frozen=True)
class ProblemType:
    status: int
    title: str
    description: str


PROBLEM_TYPES: dict[str, ProblemType] = {
    "invalid-input": ProblemType(
        422,
        "Invalid input",
        "The request is well-formed but its content cannot be used: a bad file, a wrong shape, a spec that does not "
        "fit the stored model or dataset. `errors` lists each failed field (loc, msg, type) where there are several. "
        "Nothing was stored; fix the request and send it again.",
    ),
    "unauthorized": ProblemType(
        401,
        "Unauthorized",
        "No API key, or one that is unknown, malformed or revoked. Send a key of your tenant in the X-API-Key "
        "header (create one with `pruneaudit keys create --tenant NAME`); GET /metrics needs its bearer token.",
    ),
    "not-found": ProblemType(
        404,
        "Not found",
        "No such resource for this API key: it does not exist, was deleted, or belongs to another tenant (the "
        "answer is the same, so ids leak nothing). A share link whose audit was deleted answers this too.",
    ),
    "conflict": ProblemType(
        409,
        "Conflict",
        "The resource is not in a state that allows this: a report before its audit has succeeded, cancelling an "
        "audit that has ended, deleting a model or dataset an audit uses (the detail names the audits) or an audit "
        "still queued or running (cancel it first), an Idempotency-Key whose first request is still in flight.",
    ),
    "payload-too-large": ProblemType(
        413,
        "Payload too large",
        "The upload exceeds a size limit the detail names: PRUNEAUDIT_MAX_UPLOAD_BYTES for the bytes sent, "
        "PRUNEAUDIT_MAX_DECODED_BYTES for what a dataset decompresses or decodes to (README, Upload limits). It was "
        "refused before or while it was read; nothing was kept.",
    ),
    "request-timeout": ProblemType(
        408,
        "Request timeout",
        "The request body arrived too slowly (PRUNEAUDIT_BODY_READ_TIMEOUT_S between chunks, "
        "PRUNEAUDIT_BODY_TOTAL_TIMEOUT_S in all); the connection was closed and nothing was kept. Send it again.",
    ),
    "rate-limited": ProblemType(
        429,
        "Too many requests",
        "This API key sent more requests than its rate limit allows in the current window. Wait Retry-After "
        "seconds; RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset on every answer show where you stand.",
    ),
    "database-unavailable": ProblemType(
        503,
        "Database unavailable",
        "The database cannot be reached right now: the service's state, not the request's fault. Retry after "
        "Retry-After seconds; with an Idempotency-Key, retrying POST /v1/audits never makes a second audit.",
    ),
    "unavailable": ProblemType(
        503,
        "Service unavailable",
        "A store the service needs is down or not ready: the service's state, not the request's fault. Retry after "
        "Retry-After seconds.",
    ),
    "database-not-migrated": ProblemType(
        503,
        "Database not migrated",
        "The database answers but its schema is not this release's: run `pruneaudit migrate` (or the compose "
        "file's one-shot migrate service). The API answers this until the schema is there; retry afterwards.",
    ),
    "service-busy": ProblemType(
        503,
        "Service busy",
        "The API process is decoding as many dataset bytes as it may at once (PRUNEAUDIT_MAX_DECODING_BYTES) and "
        "no room came free within PRUNEAUDIT_DECODE_WAIT_S. Nothing was kept; retry after Retry-After seconds.",
    ),
    "broker-unavailable": ProblemType(
        503,
        "Broker unavailable",
        "GET /readyz: the task broker (Redis or the embedded SQLite queue) does not answer, so audits could not be "
        "queued. The process is alive (GET /healthz) but should not get traffic until the broker is back.",
    ),
    "blob-store-unavailable": ProblemType(
        503,
        "Blob store unavailable",
        "GET /readyz: the blob store directory (PRUNEAUDIT_BLOB_DIR) cannot be written, so uploads and reports "
        "could not be stored.",
    ),
    "internal": ProblemType(
        500,
        "Internal error",
        "An unexpected error: a bug. It has been logged with the request's X-Request-ID; report it with that id.",
    ),
}


def problem_type(slug: str) -> ProblemType | None:
    """The type of a slug: one of PROBLEM_TYPES, or http-<status> for any HTTP error status."""
    if slug in PROBLEM_TYPES:
        return PROBLEM_TYPES[slug]
    code = slug.removeprefix(HTTP_PREFIX)
    if slug.startswith(HTTP_PREFIX) and code.isdigit() and 400 <= int(code) <= 599:
        try:
            status = HTTPStatus(int(code))
        except ValueError:
            return None
        return ProblemType(status.value, status.phrase, f"HTTP {status.value} {status.phrase}: {status.description}.")
    return None


def problem_type_uri(connection: HTTPConnection, slug: str) -> str:
    """Absolute, as RFC 9457 asks: the public URL when configured (behind a proxy), else the request's own."""
    public = get_settings().public_url
    base = public.rstrip("/") if public else str(connection.base_url).rstrip("/")
    return f"{base}{PROBLEMS_PATH}{slug}"
