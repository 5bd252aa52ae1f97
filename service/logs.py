"""Logs of every process (API, worker, sweeper): text or one JSON object a line (`PRUNEAUDIT_LOG_FORMAT=json|text`),
each record carrying the request id of the work it belongs to.

The request id is `X-Request-ID` when a client sends a sane one (kept, so a caller's id can be followed), or a new
one; the API returns it in the response. It lives in a context variable: the API's middleware sets it per request
(sync handlers run in threads that copy the context), `service.queue` sends it with each task as a message header,
and the worker sets it again while a task runs (worker/celery_app.py), so the worker's lines for an audit carry the
id of the request that created it. Tasks the sweeper re-sends carry none (there is no request)."""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is kept only when it is short and plain: it is written into logs and headers as it is.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("pruneaudit_request_id", default=None)
audit_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("pruneaudit_audit_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


class ContextFilter(logging.Filter):
    """Puts the context's request id and audit id on every record (None outside a request or task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.audit_id = audit_id_var.get()
        return True


def log_handler(log_format: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(audit_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(log_format: str, level: int | str = logging.INFO) -> None:
    """One handler on the root logger; uvicorn's and Celery's loggers propagate to it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(log_handler(log_format))
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def incoming_request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware: the request's id in the log context while the app handles it, and in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = incoming_request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        # Set, not reset afterwards: the server runs each request in a task of its own, whose context ends with it, and
        # an unhandled error is logged by Starlette's outermost middleware after this one has returned (service/problems
        # answers it there): that line must carry the id too.
        request_id_var.set(request_id)
        await self.app(scope, receive, send_with_id)
