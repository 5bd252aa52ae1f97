from __future__ import annotations

from fastapi import APIRouter
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import text

from service.dependencies import SessionDep, SettingsDep, StoreDep, releases_connection
from service.errors import PruneauditError
from service.queue import get_celery_client
from service.schemas.common import Problem
from service.settings import Settings

router = APIRouter(tags=["health"])


class BlobStoreUnavailable(PruneauditError):
    status = 503
    title = "Blob store unavailable"
    slug = "blob-store-unavailable"


class BrokerUnavailable(PruneauditError):
    status = 503
    title = "Broker unavailable"
    slug = "broker-unavailable"


def check_broker(settings: Settings) -> None:
    """The broker answers within readiness_timeout_s: Redis a PING, other transports a kombu connection."""
    url = settings.resolved_broker_url()
    timeout = settings.readiness_timeout_s
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
            try:
                client.ping()
            finally:
                client.close()
        else:
            with get_celery_client().connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:
        raise BrokerUnavailable(
            f"broker {maybe_sanitize_url(url)} cannot be reached: {type(exc).__name__}: {exc}"
        ) from exc


@router.get("/healthz")
def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        503: {
            "model": Problem,
            "content": {"application/problem+json": {}},
            "description": "Not ready: the database, the broker or the blob store is unavailable (named)",
        }
    },
)
@releases_connection
def readyz(session: SessionDep, store: StoreDep, settings: SettingsDep) -> dict:
    """Readiness: the database answers, the broker answers and the blob store is there; 503 problem+json naming the
    one that is not otherwise (a database error becomes 503 in service.problems, like on every other endpoint)."""
    session.execute(text("SELECT 1"))
    if not store.root.is_dir():
        raise BlobStoreUnavailable(f"blob store {store.root} is missing")
    check_broker(settings)
    return {"status": "ready"}
