from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service import audits
from service.dependencies import SessionDep, SettingsDep
from service.models import Audit, AuditStatus
from service.queue import enqueue_audit
from service.schemas.audits import AuditOut, AuditPage, AuditSpec
from service.schemas.common import PROBLEM_RESPONSES
from service.schemas.reports import AuditReport

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/audits", tags=["audits"], responses=PROBLEM_RESPONSES)


def audit_out(audit: Audit, request: Request) -> AuditOut:
    out = AuditOut.model_validate(audit)
    if audit.status == AuditStatus.succeeded:
        out.report_url = str(request.url_for("read_report", audit_id=audit.id))
    return out


@router.post("", status_code=202, response_model=AuditOut)
def create_audit(spec: AuditSpec, session: SessionDep, settings: SettingsDep, request: Request, response: Response) -> AuditOut:
    """Queue an audit: the dense model and each pruning ratio are evaluated per group by a worker."""
    audit = audits.create_audit(session, spec, settings.max_ratios)
    # Enqueue only after the row is committed, so a worker never sees a message for a missing row.
    session.commit()
    try:
        enqueue_audit(audit.id)
    except Exception:
        log.exception("could not enqueue audit %s; it stays queued in the database", audit.id)
    response.headers["Location"] = str(request.url_for("read_audit", audit_id=audit.id))
    return audit_out(audit, request)


@router.get("", response_model=AuditPage)
def list_audits(
    session: SessionDep,
    request: Request,
    status: AuditStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AuditPage:
    items, total = audits.list_audits(session, status=status, limit=limit, offset=offset)
    return AuditPage(items=[audit_out(a, request) for a in items], total=total, limit=limit, offset=offset)


@router.get("/{audit_id}", response_model=AuditOut)
def read_audit(audit_id: str, session: SessionDep, request: Request) -> AuditOut:
    return audit_out(audits.get_audit(session, audit_id), request)


@router.get("/{audit_id}/report", response_model=AuditReport)
def read_report(audit_id: str, session: SessionDep) -> AuditReport:
    """The fairness report; 409 until the audit has succeeded."""
    return audits.build_report(session, audit_id)
