from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.compare import compare_audits
from service.dependencies import SessionDep, TenantDep, releases_connection
from service.errors import InvalidInput
from service.schemas.common import PROBLEM_RESPONSES
from service.schemas.compare import Comparison

router = APIRouter(prefix="/v1", tags=["audits"], responses=PROBLEM_RESPONSES)


@router.get("/compare", response_model=Comparison)
@releases_connection
def compare(
    session: SessionDep,
    tenant: TenantDep,
    audits: Annotated[str, Query(description="Two audit ids: first,second", examples=["a1b2…,c3d4…"])],
) -> Comparison:
    """Two succeeded audits of the same dataset side by side, per method, ratio, attribute and group."""
    ids = [audit_id.strip() for audit_id in audits.split(",") if audit_id.strip()]
    if len(ids) != 2:
        raise InvalidInput(f"give exactly two audit ids separated by a comma; got {len(ids)}")
    return compare_audits(session, tenant, *ids)
