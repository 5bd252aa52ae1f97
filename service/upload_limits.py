"""Request-body cap for the whole app, applied before any byte of the body is read.

Starlette spools a multipart body to a temporary file before a handler runs, so the cap in
``BlobStore.stage`` alone would let a client fill the disk first. Here a declared Content-Length over
the cap is answered 413 at once, unread; a chunked (or lying) body is counted as it streams and cut
off at the cap. The file part itself is still capped exactly by ``BlobStore.stage``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge
from service.problem_types import problem_type_uri
from service.problems import PROBLEM_MEDIA_TYPE, problem_body
from service.settings import get_settings

# Room for the multipart envelope (boundaries, part headers, small form fields) around a file that
# is itself at most max_upload_bytes.
ENVELOPE_BYTES = 1024 * 1024


class _BodyTooLarge(Exception):
    pass


def _problem(scope: Scope, detail: str) -> tuple[dict, bytes]:
    body = json.dumps(
        problem_body(
            PayloadTooLarge.status,
            PayloadTooLarge.title,
            detail,
            problem_type_uri(HTTPConnection(scope), PayloadTooLarge.slug),
            scope.get("path", ""),
        )
    ).encode()
    start = {
        "type": "http.response.start",
        "status": PayloadTooLarge.status,
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
            await _send_problem(
                scope,
                send,
                f"the request body is {declared} bytes (Content-Length); uploads are limited to {file_limit} bytes",
            )
            return

        received = 0
        exceeded = False
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded and not response_started:
                return  # the app's answer to the aborted body (FastAPI makes it a 400) is replaced below
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await _send_problem(
                scope, send, f"the request body exceeds the limit: uploads are limited to {file_limit} bytes"
            )


async def _send_problem(scope: Scope, send: Send, detail: str) -> None:
    start, body = _problem(scope, detail)
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
