"""The request id and metrics middlewares on a small app with the service's error handlers: the id is kept or made,
returned, and on the log line of an unhandled error; requests are counted by route template."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.logs import ContextFilter, RequestIdMiddleware
from service.metrics import REQUESTS, MetricsMiddleware
from service.problems import install_error_handlers


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(ContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def small_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/items/{item_id}")
    def item(item_id: str) -> dict:
        if item_id == "boom":
            raise RuntimeError("a bug")
        return {"id": item_id}

    return app


def count(route: str, status: str) -> float:
    return REQUESTS.labels("GET", route, status)._value.get()


def test_request_id_kept_made_and_logged_with_an_unhandled_error():
    records = Records()
    access_logger = logging.getLogger("pruneaudit.access")
    logging.getLogger().addHandler(records)
    access_logger.setLevel(logging.INFO)  # the root's level in tests is WARNING; the access lines are INFO
    try:
        with TestClient(small_app(), raise_server_exceptions=False) as client:
            kept = client.get("/items/1", headers={"X-Request-ID": "deploy-42.a"})
            made = client.get("/items/1", headers={"X-Request-ID": "no spaces allowed"})
            failed = client.get("/items/boom", headers={"X-Request-ID": "trace-me"})
    finally:
        logging.getLogger().removeHandler(records)
        access_logger.setLevel(logging.NOTSET)
    assert kept.headers["x-request-id"] == "deploy-42.a"
    assert len(made.headers["x-request-id"]) == 32 and made.headers["x-request-id"] != "no spaces allowed"
    assert failed.status_code == 500 and failed.headers["content-type"] == "application/problem+json"
    assert failed.headers["x-request-id"] == "trace-me"  # the id to quote, on the answer as on the log line
    unhandled = [r for r in records.records if r.getMessage().startswith("unhandled error on /items/boom")]
    assert [r.request_id for r in unhandled] == ["trace-me"]  # type: ignore[attr-defined]
    access = [r for r in records.records if r.name == "pruneaudit.access"]
    assert [r.request_id for r in access] == ["deploy-42.a", made.headers["x-request-id"], "trace-me"]  # type: ignore[attr-defined]


def test_requests_counted_by_route_template():
    before = count("/items/{item_id}", "200"), count("unmatched", "404"), count("/items/{item_id}", "500")
    with TestClient(small_app(), raise_server_exceptions=False) as client:
        for item_id in ("a", "b", "c"):
            assert client.get(f"/items/{item_id}").status_code == 200
        assert client.get("/nowhere").status_code == 404
        assert client.get("/items/boom").status_code == 500
    after = count("/items/{item_id}", "200"), count("unmatched", "404"), count("/items/{item_id}", "500")
    assert [b - a for a, b in zip(before, after, strict=True)] == [3, 1, 1]
