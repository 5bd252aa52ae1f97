from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from service.db import get_session
from service.settings import Settings, get_settings
from service.storage import BlobStore, get_store
from service.tenancy import authenticate

# "function" scope commits before the response is sent, so a client never sees a 201 for an uncommitted row.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[BlobStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

# Declared as a security scheme, so Swagger UI's Authorize button sends it; checked here, not by FastAPI (its own
# error would not be problem+json).
api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="An API key from `pruneaudit keys create --tenant NAME`."
)


def current_tenant(session: SessionDep, api_key: Annotated[str | None, Depends(api_key_header)]) -> str:
    try:
        return authenticate(session, api_key)
    finally:
        session.commit()  # ends the read: the connection goes back to the pool while the request waits for a thread


TenantDep = Annotated[str, Depends(current_tenant)]


def releases_connection(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Commit the request's session as the (sync) endpoint returns, within its own thread-pool hop. FastAPI
    validates a sync endpoint's response in one more hop, and the session's own teardown comes after that: a
    connection held across that hop deadlocked the pool under load (200 concurrent requests: every thread
    waiting for a connection, every connection waiting for a thread). With this, a request holds a connection
    only while it runs on a thread."""

    @functools.wraps(endpoint)
    def endpoint_then_commit(*args: Any, **kwargs: Any) -> Any:
        result = endpoint(*args, **kwargs)
        kwargs["session"].commit()
        return result

    return endpoint_then_commit
