from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse

from service import audits, deletion
from service.conditional import IMMUTABLE_REPORT, none_match
from service.dependencies import SessionDep, SettingsDep, StoreDep, TenantDep, api_key_header, releases_connection
from service.errors import NotFound
from service.models import Audit, AuditStatus
from service.queue import enqueue_audit
from service.schemas.audits import AuditOut, AuditPage, AuditSpec
from service.schemas.common import PROBLEM_RESPONSES, PathId, ResourceId, Text
from service.schemas.reports import AuditReport, RunRecipe
from service.tenancy import authenticate, shared_audit

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/audits", tags=["audits"], responses=PROBLEM_RESPONSES)


def audit_out(audit: Audit, request: Request) -> AuditOut:
    out = AuditOut.model_validate(audit)
    if audit.status == AuditStatus.succeeded:
        out.report_url = str(request.url_for("read_report", audit_id=audit.id))
        if audit.report_token and audit.report_html_sha256:
            out.report_html_url = str(
                request.url_for("read_report_html", audit_id=audit.id).include_query_params(token=audit.report_token)
            )
    return out


LOCATION: dict[str, Any] = {
    "Location": {"description": "URL of the audit", "schema": {"type": "string", "format": "uri"}}
}
ETAG = {
    "ETag": {
        "description": "Entity tag of the immutable report: send it as If-None-Match",
        "schema": {"type": "string"},
    }
}
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified (If-None-Match matched)", "headers": ETAG}
}


@router.post("", status_code=202, response_model=AuditOut, responses={202: {"headers": LOCATION}})
@releases_connection
def create_audit(
    spec: AuditSpec,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description=(
                "Retry-safe creation (IETF draft): the same key and body replays the first response; the same key "
                "with another body is 422; while the first request is still in flight, 409."
            ),
        ),
    ] = None,
) -> AuditOut:
    """Queue an audit: the dense model and each method × ratio are evaluated per group by a worker."""
    if idempotency_key and (earlier := audits.replayed_audit(session, tenant, idempotency_key, spec)):
        response.headers["Location"] = str(request.url_for("read_audit", audit_id=earlier.id))
        response.headers["Idempotent-Replayed"] = "true"
        return audit_out(earlier, request)
    audit = audits.create_audit(session, tenant, spec, settings.max_runs, idempotency_key)
    # Enqueue only after the row is committed, so a worker never sees a message for a missing row.
    session.commit()
    try:
        enqueue_audit(audit.id)
    except Exception:
        log.exception("could not enqueue audit %s; it stays queued in the database", audit.id)
    response.headers["Location"] = str(request.url_for("read_audit", audit_id=audit.id))
    return audit_out(audit, request)


@router.get("", response_model=AuditPage)
@releases_connection
def list_audits(
    session: SessionDep,
    tenant: TenantDep,
    request: Request,
    status: AuditStatus | None = None,
    model_id: ResourceId | None = None,
    dataset_id: ResourceId | None = None,
    schedule_id: ResourceId | None = None,
    model_name: Annotated[Text | None, Query(max_length=200, description="Audits of any version of this model")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,  # bounded: SQLite integers are 64-bit
) -> AuditPage:
    """The tenant's audits, newest first, filtered by status, model, dataset, schedule or model name."""
    filters = dict(model_id=model_id, dataset_id=dataset_id, schedule_id=schedule_id, model_name=model_name)
    items, total = audits.list_audits(session, tenant, status=status, limit=limit, offset=offset, **filters)
    return AuditPage(items=[audit_out(a, request) for a in items], total=total, limit=limit, offset=offset)


@router.post("/{audit_id}/cancel", response_model=AuditOut)
@releases_connection
def cancel_audit(audit_id: PathId, session: SessionDep, tenant: TenantDep, request: Request) -> AuditOut:
    """Cancel an audit: queued → cancelled at once; running → stops at its next checkpoint (between runs and
    epochs) and ends cancelled. 409 when it has already ended."""
    return audit_out(audits.cancel_audit(session, tenant, audit_id), request)


@router.get("/{audit_id}", response_model=AuditOut)
@releases_connection
def read_audit(audit_id: PathId, session: SessionDep, tenant: TenantDep, request: Request) -> AuditOut:
    return audit_out(audits.get_audit(session, tenant, audit_id), request)


def not_modified(request: Request, etag: str) -> Response | None:
    if none_match(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=report_headers(etag))
    return None


def report_headers(etag: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": IMMUTABLE_REPORT}


@router.get("/{audit_id}/report", response_model=AuditReport, responses={200: {"headers": ETAG}, **NOT_MODIFIED})
@releases_connection
def read_report(audit_id: PathId, session: SessionDep, tenant: TenantDep, request: Request, response: Response):
    """The fairness report with the policy verdict; 409 until the audit has succeeded. Immutable once
    written: send `If-None-Match` with the ETag to get 304."""
    audit = audits.succeeded_audit(session, tenant, audit_id)
    etag = audits.report_etag(audit)
    if cached := not_modified(request, etag):
        return cached
    response.headers.update(report_headers(etag))
    return audits.assemble_report(
        audit, lambda run: str(request.url_for("download_run_weights", audit_id=audit_id, run_id=run.id))
    )


@router.get(
    "/{audit_id}/report.csv",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/csv": {}}, "headers": ETAG}, **NOT_MODIFIED},
)
@releases_connection
def read_report_csv(audit_id: PathId, session: SessionDep, tenant: TenantDep, request: Request) -> Response:
    """The per-group table, one row per run × attribute × group, numbers exactly as in the JSON."""
    audit = audits.succeeded_audit(session, tenant, audit_id)
    etag = audits.report_etag(audit)
    if cached := not_modified(request, etag):
        return cached
    return Response(
        audits.report_csv(audits.assemble_report(audit)),
        media_type="text/csv",
        headers={**report_headers(etag), "Content-Disposition": f'attachment; filename="audit-{audit_id}.csv"'},
    )


@router.get(
    "/{audit_id}/report.html",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "headers": ETAG}, **NOT_MODIFIED},
)
@releases_connection
def read_report_html(
    audit_id: PathId,
    session: SessionDep,
    store: StoreDep,
    request: Request,
    api_key: Annotated[str | None, Depends(api_key_header)] = None,
    token: Annotated[
        str | None,
        Query(max_length=64, description="The share token of `report_html_url`: opens this report without an API key."),
    ] = None,
) -> Response:
    """The report for people: verdict, per-group curves and diagnostics plots, self-contained (no outside requests).
    Opens with the tenant's API key, or with the audit's share token (`report_html_url`) in a browser."""
    tenant = shared_audit(session, audit_id, token).tenant_id if token else authenticate(session, api_key)
    audit = audits.succeeded_audit(session, tenant, audit_id)
    if audit.report_html_sha256 is None:
        raise NotFound(f"audit {audit_id} has no HTML report (it was not rendered); the JSON report is complete")
    etag = audits.report_etag(audit)
    if cached := not_modified(request, etag):
        return cached
    return FileResponse(
        store.blob_path(audit.report_html_sha256), media_type="text/html; charset=utf-8", headers=report_headers(etag)
    )


@router.get(
    "/{audit_id}/runs/{run_id}/weights",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}},
)
@releases_connection
def download_run_weights(
    audit_id: PathId, run_id: PathId, session: SessionDep, tenant: TenantDep, store: StoreDep
) -> FileResponse:
    """The run's pruned (and fine-tuned) weights as safetensors; re-upload them with the run's
    recipe.architecture to evaluate the same model again."""
    run = audits.get_run(session, tenant, audit_id, run_id)
    if run.weights_sha256 is None:
        raise NotFound(f"run {run_id} has no stored weights (the dense baseline is the uploaded model)")
    name = f"{run.label}-{run.ratio:g}.safetensors"
    return FileResponse(store.blob_path(run.weights_sha256), media_type="application/octet-stream", filename=name)


@router.get(
    "/{audit_id}/runs/{run_id}/weights.onnx",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "ONNX model"}},
)
@releases_connection
def download_run_onnx(
    audit_id: PathId, run_id: PathId, session: SessionDep, tenant: TenantDep, store: StoreDep
) -> FileResponse:
    """An imported ONNX model's run as ONNX: the uploaded graph with the run's pruned (and fine-tuned) weights
    written back; onnxruntime loads it as it loaded the upload."""
    run = audits.get_run(session, tenant, audit_id, run_id)
    if run.onnx_sha256 is None:
        raise NotFound(f"run {run_id} has no ONNX weights (only runs of an uploaded ONNX model have them)")
    name = f"{run.label}-{run.ratio:g}.onnx"
    return FileResponse(store.blob_path(run.onnx_sha256), media_type="application/octet-stream", filename=name)


# exclude_unset: the recipe is served as stored (an unmitigated run's has no `mitigation` key), as in the report.
@router.get("/{audit_id}/runs/{run_id}/recipe", response_model=RunRecipe, response_model_exclude_unset=True)
@releases_connection
def read_run_recipe(audit_id: PathId, run_id: PathId, session: SessionDep, tenant: TenantDep) -> dict:
    """How the run was made: method, ratio, dense layers, seed, and the architecture JSON to upload its weights with."""
    run = audits.get_run(session, tenant, audit_id, run_id)
    if run.result is None:
        raise NotFound(f"run {run_id} has no result yet (it is {run.status.value})")
    return run.result["recipe"]


@router.delete("/{audit_id}", status_code=204, response_class=Response)
def delete_audit(audit_id: str, session: SessionDep, tenant: TenantDep, store: StoreDep) -> Response:
    """Delete an ended audit: its runs, report files and share link (its token opens nothing any more). A queued
    or running audit is 409: cancel it first. Its model and dataset stay (delete them on their own)."""
    blobs = deletion.delete_audit(session, tenant, audit_id)
    session.commit()
    deletion.remove_unreferenced(session, store, blobs)
    session.commit()
    store.remove_work(audit_id)
    return Response(status_code=204)
