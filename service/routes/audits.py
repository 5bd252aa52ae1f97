from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from service import audits
from service.dependencies import SessionDep, SettingsDep, StoreDep
from service.errors import NotFound
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
    audit = audits.create_audit(session, spec, settings.max_runs)
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
def read_report(audit_id: str, session: SessionDep, request: Request) -> AuditReport:
    """The fairness report; 409 until the audit has succeeded."""
    return audits.build_report(
        session, audit_id,
        lambda run: str(request.url_for("download_run_weights", audit_id=audit_id, run_id=run.id)),
    )


@router.get(
    "/{audit_id}/runs/{run_id}/weights",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}},
)
def download_run_weights(audit_id: str, run_id: str, session: SessionDep, store: StoreDep) -> FileResponse:
    """The run's pruned (and fine-tuned) weights as safetensors; re-upload them with the run's
    recipe.architecture to evaluate the same model again."""
    run = audits.get_run(session, audit_id, run_id)
    if run.weights_sha256 is None:
        raise NotFound(f"run {run_id} has no stored weights (the dense baseline is the uploaded model)")
    name = f"{run.label}-{run.ratio:g}.safetensors"
    return FileResponse(store.blob_path(run.weights_sha256), media_type="application/octet-stream", filename=name)


@router.get("/{audit_id}/runs/{run_id}/recipe")
def read_run_recipe(audit_id: str, run_id: str, session: SessionDep) -> dict:
    """How the run was made: method, ratio, dense layers, seed, and the architecture JSON to upload its weights with."""
    return audits.get_run(session, audit_id, run_id).recipe
