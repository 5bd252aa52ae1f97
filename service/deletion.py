"""Deleting models, datasets and audits, and the blobs no row references any more.

A model or dataset that any audit names (whatever its state, finished ones too: a report describes its inputs)
or any schedule names by id cannot be deleted: 409 naming them. Delete those audits first. An audit that is queued
or running cannot be deleted: 409, cancel it first (a worker still writes to it). Deleting an audit removes its
runs, its report and its share link (the token opens nothing any more); schedule firings keep their history
without it.

Blobs are content-addressed, so one file may back several rows (the same weights uploaded twice, a run's weights
re-uploaded as a model): a blob is removed only once, after the commit, no row of any tenant references it."""

from __future__ import annotations

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import rows_matched
from service.errors import Conflict
from service.models import Audit, AuditStatus, Dataset, Model, Run, Schedule, ScheduleFiring
from service.storage import BlobStore
from service.tenancy import owned

ENDED = (AuditStatus.succeeded, AuditStatus.failed, AuditStatus.cancelled)
LISTED_IDS = 10  # a 409 names this many audits, then counts the rest


def _spec_names(spec_column, key: str, entity_id: str):
    """The spec (JSON) names the id under `key`: JSON_EXTRACT on SQLite, ->> on PostgreSQL."""
    return spec_column[key].as_string() == entity_id


def _schedules_naming(session: Session, tenant_id: str, keys: tuple[str, ...], entity_id: str) -> list[str]:
    naming = or_(*(_spec_names(Schedule.spec, key, entity_id) for key in keys))
    return list(session.scalars(select(Schedule.id).where(Schedule.tenant_id == tenant_id, naming)))


def _refusal(kind: str, entity_id: str, audit_ids: list[str], schedule_ids: list[str]) -> Conflict:
    users = []
    if audit_ids:
        more = f" and {len(audit_ids) - LISTED_IDS} more" if len(audit_ids) > LISTED_IDS else ""
        users.append(f"audit(s) {', '.join(audit_ids[:LISTED_IDS])}{more}")
    if schedule_ids:
        users.append(f"schedule(s) {', '.join(schedule_ids[:LISTED_IDS])}")
    return Conflict(f"{kind} {entity_id} is used by {' and '.join(users)}; delete those first")


def _flush_delete(session: Session, row, kind: str) -> None:
    """An audit created concurrently with the delete trips the foreign key: the same 409 as one seen before."""
    row_id = row.id
    try:
        session.delete(row)
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"{kind} {row_id} is used by an audit created meanwhile; delete that first") from None


def delete_model(session: Session, tenant_id: str, model_id: str) -> list[str]:
    """Delete an unused model; the blobs it referenced (to remove once unreferenced, after the commit)."""
    model = owned(session, Model, model_id, tenant_id)
    audit_ids = list(session.scalars(select(Audit.id).where(Audit.model_id == model_id).order_by(Audit.created_at)))
    schedule_ids = _schedules_naming(session, tenant_id, ("model_id",), model_id)
    if audit_ids or schedule_ids:
        raise _refusal("model", model_id, audit_ids, schedule_ids)
    blobs = [model.sha256, *([model.architecture["graph_sha256"]] if model.architecture_name == "onnx" else [])]
    _flush_delete(session, model, "model")
    return blobs


def delete_dataset(session: Session, tenant_id: str, dataset_id: str) -> None:
    """Delete an unused dataset (its arrays live in a directory of its own: BlobStore.dataset_dir)."""
    dataset = owned(session, Dataset, dataset_id, tenant_id)
    audit_ids = list(
        session.scalars(
            select(Audit.id)
            .where(Audit.tenant_id == tenant_id)
            .where(or_(Audit.dataset_id == dataset_id, _spec_names(Audit.spec, "train_dataset_id", dataset_id)))
            .order_by(Audit.created_at)
        )
    )
    schedule_ids = _schedules_naming(session, tenant_id, ("dataset_id", "train_dataset_id"), dataset_id)
    if audit_ids or schedule_ids:
        raise _refusal("dataset", dataset_id, audit_ids, schedule_ids)
    _flush_delete(session, dataset, "dataset")


def delete_audit(session: Session, tenant_id: str, audit_id: str) -> list[str]:
    """Delete an ended audit with its runs; the blobs they referenced (409 while it is queued or running)."""
    return delete_ended_audit(session, owned(session, Audit, audit_id, tenant_id))


def delete_ended_audit(session: Session, audit: Audit) -> list[str]:
    """The conditional DELETE is the state check, so a worker's write cannot slip between a check and the delete."""
    audit_id, status = audit.id, audit.status
    run_blobs = session.execute(select(Run.weights_sha256, Run.onnx_sha256).where(Run.audit_id == audit_id)).all()
    blobs = [*(sha for row in run_blobs for sha in row), audit.report_html_sha256]
    # Explicit rather than left to ON DELETE: the same statements on SQLite and PostgreSQL, whatever the schema's age.
    session.execute(update(ScheduleFiring).where(ScheduleFiring.audit_id == audit_id).values(audit_id=None))
    session.execute(delete(Run).where(Run.audit_id == audit_id))
    if rows_matched(session, delete(Audit).where(Audit.id == audit_id, Audit.status.in_(ENDED))) == 0:
        session.rollback()
        raise Conflict(f"audit {audit_id} is {status.value}: cancel it first (POST .../cancel), then delete it")
    session.expunge(audit)
    return [sha for sha in blobs if sha]


def referenced(session: Session, sha256: str) -> bool:
    """Whether any row of any tenant references the blob."""
    found = session.scalar(
        select(
            or_(
                exists().where(Model.sha256 == sha256),
                exists().where(Model.architecture["graph_sha256"].as_string() == sha256),
                exists().where(or_(Run.weights_sha256 == sha256, Run.onnx_sha256 == sha256)),
                exists().where(Audit.report_html_sha256 == sha256),
            )
        )
    )
    return bool(found)


def remove_unreferenced(session: Session, store: BlobStore, blobs: list[str]) -> list[str]:
    """After the commit: remove each blob no row references any more; the ones removed."""
    removed = []
    for sha256 in dict.fromkeys(blobs):
        if not referenced(session, sha256):
            store.blob_path(sha256).unlink(missing_ok=True)
            removed.append(sha256)
    return removed
