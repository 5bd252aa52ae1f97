from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from service.dependencies import SessionDep, StoreDep, releases_connection
from service.errors import PruneauditError
from service.schemas.common import Problem

router = APIRouter(tags=["health"])


class BlobStoreUnavailable(PruneauditError):
    status = 503
    title = "Blob store unavailable"
    slug = "blob-store-unavailable"


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
            "description": "Not ready: the database or the blob store is unavailable",
        }
    },
)
@releases_connection
def readyz(session: SessionDep, store: StoreDep) -> dict:
    """Readiness: the database answers and the blob store is there; 503 problem+json otherwise (a database
    error becomes 503 in service.problems, like on every other endpoint)."""
    session.execute(text("SELECT 1"))
    if not store.root.is_dir():
        raise BlobStoreUnavailable(f"blob store {store.root} is missing")
    return {"status": "ready"}
