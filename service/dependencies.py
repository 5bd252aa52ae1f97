from __future__ import annotations

from typing import Annotated

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
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="An API key from `pruneaudit keys create --tenant NAME`.")


def current_tenant(session: SessionDep, api_key: Annotated[str | None, Depends(api_key_header)]) -> str:
    return authenticate(session, api_key)


TenantDep = Annotated[str, Depends(current_tenant)]
