from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from service.db import get_session
from service.settings import Settings, get_settings
from service.storage import BlobStore, get_store


# "function" scope commits before the response is sent, so a client never sees a 201 for an uncommitted row.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[BlobStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
