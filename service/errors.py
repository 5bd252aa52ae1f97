"""The service's error hierarchy. Every error a client can cause is one of these; `service.problems`
maps them to RFC 9457 problem+json in one place, so handlers and services only raise."""

from __future__ import annotations


class PruneauditError(Exception):
    status: int = 500
    title: str = "Internal error"
    slug: str = "internal"
    retry_after_s: int | None = None  # sent as Retry-After: the condition is the service's, and passes

    def __init__(self, detail: str, *, errors: list[dict] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class InvalidInput(PruneauditError):
    """The request is well-formed but its content cannot be used (bad file, wrong shape, bad spec)."""

    status = 422
    title = "Invalid input"
    slug = "invalid-input"


class Unauthorized(PruneauditError):
    """No API key, or one that is unknown or revoked."""

    status = 401
    title = "Unauthorized"
    slug = "unauthorized"


class NotFound(PruneauditError):
    status = 404
    title = "Not found"
    slug = "not-found"


class Conflict(PruneauditError):
    status = 409
    title = "Conflict"
    slug = "conflict"


class PayloadTooLarge(PruneauditError):
    status = 413
    title = "Payload too large"
    slug = "payload-too-large"


class ServiceUnavailable(PruneauditError):
    """A store the service needs is down or not ready; the client should retry."""

    status = 503
    title = "Service unavailable"
    slug = "unavailable"
    retry_after_s = 5


class DatabaseNotMigrated(ServiceUnavailable):
    title = "Database not migrated"
    slug = "database-not-migrated"


class RequestTimeout(PruneauditError):
    """The client sent its request body too slowly."""

    status = 408
    title = "Request timeout"
    slug = "request-timeout"


class ServiceBusy(ServiceUnavailable):
    """The server has no room for the request right now (it is not the request's fault): retry."""

    title = "Service busy"
    slug = "service-busy"
