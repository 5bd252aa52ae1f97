"""Request-body cap and deadlines for the whole app, applied before any byte of the body is read.

Starlette spools a multipart body to a temporary file before a handler runs, so the cap in
``BlobStore.stage`` alone would let a client fill the disk first. Here a declared Content-Length over
the cap is answered 413 at once, unread; a chunked (or lying) body is counted as it streams and cut
off at the cap. The file part itself is still capped exactly by ``BlobStore.stage``.

A body that stalls (no chunk for ``body_read_timeout_s``) or trickles (not all in within
``body_total_timeout_s``) is answered 408 and its connection closed: a slow client would otherwise hold a
request, and a thread waiting for the form, as long as it likes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import anyio
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, PruneauditError, RequestTimeout
from service.problem_types import problem_type_uri
from service.problems import PROBLEM_MEDIA_TYPE, problem_body
from service.settings import get_settings

# Room for the multipart envelope (boundaries, part headers, small form fields) around a file that
# is itself at most max_upload_bytes.
ENVELOPE_BYTES = 1024 * 1024


class _BodyRefused(Exception):
    pass


def _problem(scope: Scope, error: PruneauditError) -> tuple[dict, bytes]:
    body = json.dumps(
        problem_body(
            error.status,
            error.title,
            error.detail,
            problem_type_uri(HTTPConnection(scope), error.slug),
            scope.get("path", ""),
        )
    ).encode()
    start = {
        "type": "http.response.start",
        "status": error.status,
        # The unread rest of the body cannot be skipped cheaply: end the connection after this answer.
        "headers": [
            (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    }
    return start, body


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_upload_bytes: Callable[[], int] | None = None) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes or (lambda: get_settings().max_upload_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        file_limit = self.max_upload_bytes()
        limit = file_limit + ENVELOPE_BYTES
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            too_large = (
                f"the request body is {declared} bytes (Content-Length); uploads are limited to {file_limit} bytes"
            )
            await _send_problem(scope, send, PayloadTooLarge(too_large))
            return

        settings = get_settings()
        deadline = time.monotonic() + settings.body_total_timeout_s
        received = 0
        body_done = False
        refused: PruneauditError | None = None
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received, body_done, refused
            if body_done:  # after the body only http.disconnect comes, whenever it does: no deadline
                return await receive()
            wait_s = min(settings.body_read_timeout_s, deadline - time.monotonic())
            with anyio.move_on_after(max(wait_s, 0)) as waiting:
                message = await receive()
            if waiting.cancelled_caught:
                refused = RequestTimeout(_too_slow(settings.body_read_timeout_s, settings.body_total_timeout_s))
                raise _BodyRefused()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    refused = PayloadTooLarge(
                        f"the request body exceeds the limit: uploads are limited to {file_limit} bytes"
                    )
                    raise _BodyRefused()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused and not response_started:
                return  # the app's answer to the aborted body (FastAPI makes it a 400) is replaced below
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyRefused:
            pass
        except Exception:
            if not refused:
                raise
        if refused and not response_started:
            await _send_problem(scope, send, refused)


def _too_slow(read_timeout_s: float, total_timeout_s: float) -> str:
    return (
        f"the request body arrived too slowly: each chunk must follow within {read_timeout_s:g} s and the whole "
        f"body within {total_timeout_s:g} s"
    )


async def _send_problem(scope: Scope, send: Send, error: PruneauditError) -> None:
    start, body = _problem(scope, error)
    await send(start)
    await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
