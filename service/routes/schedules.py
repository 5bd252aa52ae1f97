from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service import schedules
from service.dependencies import SessionDep, SettingsDep, TenantDep, releases_connection
from service.schemas.common import PROBLEM_RESPONSES, PathId
from service.schemas.schedules import FiringOut, FiringPage, ScheduleIn, ScheduleOut, SchedulePage, SchedulePatch

router = APIRouter(prefix="/v1/schedules", tags=["schedules"], responses=PROBLEM_RESPONSES)
Limit = Annotated[int, Query(ge=1, le=200)]
Offset = Annotated[int, Query(ge=0, le=2**62)]


@router.post("", status_code=201, response_model=ScheduleOut)
@releases_connection
def create_schedule(body: ScheduleIn, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> ScheduleOut:
    """A schedule: the sweeper creates `spec`'s audit at every tick of `cron` (in `timezone`) or every `interval_s`.
    The spec is checked now (its references must resolve); ticks missed while no sweeper ran fire once, late."""
    return ScheduleOut.model_validate(schedules.create_schedule(session, tenant, body, settings))


@router.get("", response_model=SchedulePage)
@releases_connection
def list_schedules(session: SessionDep, tenant: TenantDep, limit: Limit = 50, offset: Offset = 0) -> SchedulePage:
    items, total = schedules.list_schedules(session, tenant, limit, offset)
    return SchedulePage(items=[ScheduleOut.model_validate(s) for s in items], total=total, limit=limit, offset=offset)


@router.get("/{schedule_id}", response_model=ScheduleOut)
@releases_connection
def read_schedule(schedule_id: PathId, session: SessionDep, tenant: TenantDep) -> ScheduleOut:
    return ScheduleOut.model_validate(schedules.get_schedule(session, tenant, schedule_id))


@router.patch("/{schedule_id}", response_model=ScheduleOut)
@releases_connection
def update_schedule(
    schedule_id: PathId, patch: SchedulePatch, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> ScheduleOut:
    """Change a schedule; `{"paused": true}` pauses it, `{"paused": false}` resumes it from the next tick."""
    return ScheduleOut.model_validate(schedules.update_schedule(session, tenant, schedule_id, patch, settings))


@router.delete("/{schedule_id}", status_code=204, response_class=Response)
@releases_connection
def delete_schedule(schedule_id: PathId, session: SessionDep, tenant: TenantDep) -> Response:
    """The schedule and its history; the audits it created stay."""
    schedules.delete_schedule(session, tenant, schedule_id)
    return Response(status_code=204)


@router.get("/{schedule_id}/audits", response_model=FiringPage)
@releases_connection
def schedule_history(
    schedule_id: PathId, session: SessionDep, tenant: TenantDep, limit: Limit = 50, offset: Offset = 0
) -> FiringPage:
    """Every tick, newest first: its audit and that audit's status, or why none was created; late ones flagged."""
    rows, total = schedules.history(session, tenant, schedule_id, limit, offset)
    items = [FiringOut.model_validate(firing).model_copy(update={"audit_status": status}) for firing, status in rows]
    return FiringPage(items=items, total=total, limit=limit, offset=offset)
