"""A small typed HTTP client of the pruneaudit API for command-line tools (`pruneaudit gate`). Every failure to get
a usable answer — the server unreachable, a proxy's HTML error page, a problem+json refusal — is a `ClientError`
with a sentence saying what happened, so a CLI can print it and exit, never show a traceback."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

ACTIVE_STATUSES = ("queued", "running")


class ClientError(Exception):
    """No usable answer from the API; str() is the reason in words."""


@dataclass
class ApiClient:
    url: str
    api_key: str | None = None
    timeout_s: float = 60.0

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return httpx.request(
                method,
                f"{self.url.rstrip('/')}{path}",
                headers={"X-API-Key": self.api_key or ""},
                timeout=self.timeout_s,
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.url}: {type(exc).__name__}: {exc}") from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> dict:
        response = self._send(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            # Not the API's answer: a proxy or load balancer in between (502/504 HTML pages), or a wrong URL.
            kind = response.headers.get("content-type", "no content type")
            raise ClientError(
                f"{method} {path}: HTTP {response.status_code} with a non-JSON body ({kind}): "
                f"{response.text[:200].strip()!r}; is {self.url} the pruneaudit API?"
            ) from None
        if response.status_code >= 400 or not isinstance(body, dict):
            detail = body.get("detail", body) if isinstance(body, dict) else body
            raise ClientError(f"{method} {path}: HTTP {response.status_code}: {detail}")
        return body

    def text(self, path: str) -> str:
        """A GET whose answer is not JSON (report.csv, report.html); a refusal is a ClientError as elsewhere."""
        response = self._send("GET", path)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:200].strip()
            raise ClientError(f"GET {path}: HTTP {response.status_code}: {detail}")
        return response.text

    def submit_audit(self, spec: dict) -> dict:
        return self._request("POST", "/v1/audits", json=spec)

    def audit(self, audit_id: str) -> dict:
        return self._request("GET", f"/v1/audits/{audit_id}")

    def report(self, audit_id: str) -> dict:
        return self._request("GET", f"/v1/audits/{audit_id}/report")

    def wait_for_audit(self, audit_id: str, timeout_s: float, poll_s: float = 1.0) -> dict:
        """The audit once it has ended (succeeded, failed or cancelled); ClientError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            audit = self.audit(audit_id)
            if audit.get("status") not in ACTIVE_STATUSES:
                return audit
            if time.monotonic() >= deadline:
                raise ClientError(
                    f"audit {audit_id} is still {audit.get('status')} after {timeout_s:g} s "
                    f"({audit.get('progress_message') or 'no progress message'}); raise --timeout"
                )
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
