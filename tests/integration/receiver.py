"""A webhook receiver on 127.0.0.1 for tests: records every request and verifies its Standard Webhooks signature
with the `standardwebhooks` library; per path it can answer a number of failures first, or hang once."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    path: str
    webhook_id: str
    body: dict
    verified: bool


@dataclass
class Receiver:
    secrets: dict[str, str] = field(default_factory=dict)  # path → the webhook's secret
    failures: dict[str, int] = field(default_factory=dict)  # path → how many 500s to answer first
    hang: dict[str, threading.Event] = field(default_factory=dict)  # path → the first request waits for this
    received: list[Received] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def start(self) -> str:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                raw = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook(receiver.secrets[self.path]).verify(raw, headers)
                    verified = True
                except (WebhookVerificationError, KeyError):
                    verified = False
                receiver.received.append(Received(self.path, headers.get("webhook-id", ""), json.loads(raw), verified))
                receiver.arrived.set()
                if (release := receiver.hang.pop(self.path, None)) is not None:
                    release.wait(30)
                failing = receiver.failures.get(self.path, 0)
                if failing:
                    receiver.failures[self.path] = failing - 1
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]
