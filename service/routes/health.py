from __future__ import annotations

from fastapi import APIRouter
from kombu.utils.url import maybe_sanitize_url

from service.dependencies import SessionDep, SettingsDep, StoreDep, releases_connection
from service.errors import ServiceUnavailable
from service.migrate import check_schema_at_head
from service.queue import get_celery_client
from service.schemas.common import Problem
from service.settings import Settings

router = APIRouter(tags=["health"])


class BlobStoreUnavailable(ServiceUnavailable):
    title = "Blob store unavailable"
    slug = "blob-store-unavailable"


class BrokerUnavailable(ServiceUnavailable):
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
            "description": "Not ready: the database (down, too slow or not migrated), the broker or the blob store "
            "is unavailable (named)",
        }
    },
)
@releases_connection
def readyz(session: SessionDep, store: StoreDep, settings: SettingsDep) -> dict:
    """Readiness: the database answers with this release's schema, the broker answers and the blob store is there;
    503 problem+json naming the one that is not otherwise (a database error becomes 503 in service.problems, like on
    every other endpoint)."""
    check_schema_at_head(session)
    if not store.root.is_dir():
        raise BlobStoreUnavailable(f"blob store {store.root} is missing")
    check_broker(settings)
    return {"status": "ready"}
