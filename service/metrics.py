"""Prometheus metrics at `GET /metrics` (text exposition format; not in the OpenAPI document, not rate limited).

Two kinds, each correct with several API processes:
- Request metrics (`pruneaudit_http_requests_total`, `pruneaudit_http_request_duration_seconds`), labelled by route
  template (`/v1/audits/{audit_id}`, never the raw path, so ids do not explode the series), method and status. Each
  process counts its own; prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, which `pruneaudit api`
  sets to `<var_dir>/prometheus` unless given) adds them up at scrape, so any process answers for all of one host.
  Give every host or container its own directory, emptied when the deployment starts.
- Figures of audits, runs and workers, read from the database at scrape time (the rows are the source of truth, and
  every process reads the same rows): audits by status, age of the oldest queued audit, run durations by method,
  and the age of each worker's latest heartbeat.

`PRUNEAUDIT_METRICS_TOKEN`, when set, makes `/metrics` require `Authorization: Bearer <token>`; otherwise it is open
like `/healthz` (it holds counts, no tenant's data)."""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import extract, func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import session_scope
from service.models import Audit, AuditStatus, Run, RunStatus
from service.problems import problem
from service.settings import get_settings

log = logging.getLogger(__name__)
access_log = logging.getLogger("pruneaudit.access")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE = "unmatched"  # 404s: one series for every unknown path

REQUESTS = Counter(
    "pruneaudit_http_requests", "HTTP requests answered, by route template", ["method", "route", "status"]
)
LATENCY = Histogram(
    "pruneaudit_http_request_duration_seconds",
    "Time from request to the end of the response, by route template",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

router = APIRouter(include_in_schema=False)


def route_template(scope: Scope) -> str:
    # FastAPI's router puts the matched route into the scope while routing; unmatched requests have none.
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


class MetricsMiddleware:
    """ASGI middleware: counts each HTTP request, times it by route template and writes its access log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route, seconds = route_template(scope), time.perf_counter() - started
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            LATENCY.labels(scope["method"], route).observe(seconds)
            # The access log (uvicorn's is off): inside RequestIdMiddleware, so the line carries the request id.
            access_log.info(
                "%s %s %d %.1f ms",
                scope["method"],
                scope.get("path", ""),
                status,
                seconds * 1000,
                extra={"route": route, "status": status, "duration_ms": round(seconds * 1000, 1)},
            )


def seconds_since(moment: datetime | None, now: datetime) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite returns naive datetimes; they are stored in UTC
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (now - moment).total_seconds())


class DatabaseCollector:
    """Audit, run and worker figures from the rows, computed at each scrape."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pruneaudit_database_up", "1 when the database answered this scrape, else 0")
        try:
            figures = list(self.database_figures())
        except SQLAlchemyError as exc:
            # The request metrics are still worth serving while the database is away; this says why the rest is not.
            log.warning("metrics: the database figures are left out: %s", str(exc).splitlines()[0])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from figures

    def database_figures(self) -> Iterator[Metric]:
        now = datetime.now(UTC)
        with session_scope() as session:
            by_status = dict(session.execute(select(Audit.status, func.count()).group_by(Audit.status)).all())
            oldest_queued = session.scalar(select(func.min(Audit.created_at)).where(Audit.status == AuditStatus.queued))
            seconds = run_seconds(session.get_bind().dialect.name)
            durations = session.execute(
                select(Run.method, func.count(), func.sum(seconds))
                .where(Run.status == RunStatus.succeeded, Run.started_at.is_not(None), Run.finished_at.is_not(None))
                .group_by(Run.method)
            ).all()
            heartbeats = session.execute(
                select(Run.worker, func.max(Run.heartbeat_at))
                .where(Run.status == RunStatus.running, Run.worker.is_not(None))
                .group_by(Run.worker)
            ).all()
        audits = GaugeMetricFamily("pruneaudit_audits", "Audits by status", labels=["status"])
        for status in AuditStatus:
            audits.add_metric([status.value], by_status.get(status, 0))
        yield audits
        queued_age = GaugeMetricFamily(
            "pruneaudit_oldest_queued_audit_age_seconds", "Age of the oldest queued audit (0 when none is queued)"
        )
        queued_age.add_metric([], seconds_since(oldest_queued, now) or 0.0)
        yield queued_age
        yield from run_duration_metrics(durations)
        beats = GaugeMetricFamily(
            "pruneaudit_worker_heartbeat_age_seconds",
            "Seconds since each worker's latest heartbeat, over the runs it is computing",
            labels=["worker"],
        )
        for worker, beat in heartbeats:
            beats.add_metric([worker or "unknown"], seconds_since(beat, now) or 0.0)
        yield beats


def run_seconds(dialect: str):
    """A run's wall time in seconds as SQL (each database spells the difference of two timestamps its own way)."""
    if dialect == "sqlite":
        return (func.julianday(Run.finished_at) - func.julianday(Run.started_at)) * 86400.0
    return extract("epoch", Run.finished_at - Run.started_at)


def run_duration_metrics(rows) -> Iterator[Metric]:
    """Succeeded runs' wall time by pruning method, as a count and a sum (a summary without quantiles)."""
    durations = SummaryMetricFamily(
        "pruneaudit_run_duration_seconds", "Wall time of succeeded runs, by pruning method", labels=["method"]
    )
    for method, n, seconds in sorted(rows):
        durations.add_metric([method], count_value=n, sum_value=float(seconds or 0.0))
    yield durations


def scrape() -> bytes:
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:  # one process (tests, `pruneaudit api` run by hand with the variable unset): its own counters
        registry.register(REQUESTS)
        registry.register(LATENCY)
    registry.register(DatabaseCollector())
    return generate_latest(registry)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    token = get_settings().metrics_token
    if token:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return problem(
                request, 401, "Unauthorized", "GET /metrics needs Authorization: Bearer <metrics token>", "unauthorized"
            )
    return Response(scrape(), media_type=CONTENT_TYPE_LATEST)
