from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.compare import compare_audits
from service.dependencies import SessionDep, TenantDep, releases_connection
from service.errors import InvalidInput
from service.schemas.common import PROBLEM_RESPONSES, is_resource_id
from service.schemas.compare import Comparison

router = APIRouter(prefix="/v1", tags=["audits"], responses=PROBLEM_RESPONSES)


@router.get("/compare", response_model=Comparison)
@releases_connection
def compare(
    session: SessionDep,
    tenant: TenantDep,
    audits: Annotated[
        str, Query(max_length=100, description="Two audit ids: first,second (422 unless both are ids the service made)")
    ],
) -> Comparison:
    """Two succeeded audits of the same dataset side by side, per method, ratio, attribute and group."""
    ids = [audit_id.strip() for audit_id in audits.split(",") if audit_id.strip()]
    if len(ids) != 2:
        raise InvalidInput(f"give exactly two audit ids separated by a comma; got {len(ids)}")
    if malformed := [audit_id for audit_id in ids if not is_resource_id(audit_id)]:
        raise InvalidInput(f"{malformed[0]!r} is not an audit id (ids are 32 lowercase hex digits)")
    return compare_audits(session, tenant, *ids)
