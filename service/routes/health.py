from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from service.dependencies import SessionDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: SessionDep, store: StoreDep) -> dict:
    session.execute(text("SELECT 1"))
    if not store.root.is_dir():
        raise RuntimeError(f"blob store {store.root} is missing")
    return {"status": "ready"}
