"""The one task: claim the audit row, run the pipeline, store results. The database row is the source of
truth; every state change is a conditional UPDATE, so a duplicate delivery is a no-op."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import object_session

from service.audits import assemble_report
from service.db import session_scope
from service.models import Audit, AuditStatus, Dataset, GroupMetric, Run, utcnow
from service.queue import RUN_AUDIT_TASK
from service.schemas.audits import MethodSpec, MitigationSpec
from service.settings import get_settings
from service.storage import get_store
from worker.celery_app import app

log = logging.getLogger(__name__)


def claim(audit_id: str) -> int | None:
    """queued → running; returns this attempt's number, or None when another delivery got there first (or the
    audit ended). Every later write matches the attempt, so a worker that comes back after the sweeper
    re-queued its audit cannot write over the new attempt."""
    with session_scope() as session:
        result = session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.status == AuditStatus.queued)
            .values(status=AuditStatus.running, attempts=Audit.attempts + 1, started_at=utcnow(),
                    heartbeat_at=utcnow(), progress=0.0, progress_message="started", error=None)
        )
        if result.rowcount != 1:
            return None
        # Read inside the claiming transaction, which holds the row.
        return session.scalar(select(Audit.attempts).where(Audit.id == audit_id))


class AuditCancelled(Exception):
    """Raised at a checkpoint when the audit was asked to stop."""


class AttemptSuperseded(Exception):
    """Raised at a checkpoint when this attempt no longer owns the audit (re-queued by the sweeper after its
    heartbeat went stale, or ended): its work is abandoned, never written."""


def report_progress(audit_id: str, attempt: int, fraction: float, message: str) -> None:
    """Progress, heartbeat and the cancellation checkpoint (called between runs and epochs)."""
    with session_scope() as session:
        written = session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.status == AuditStatus.running, Audit.attempts == attempt)
            .values(progress=fraction, progress_message=message, heartbeat_at=utcnow())
        )
        if written.rowcount != 1:
            raise AttemptSuperseded(audit_id)
        if session.scalar(select(Audit.cancel_requested).where(Audit.id == audit_id)):
            raise AuditCancelled(audit_id)


def finish(audit_id: str, attempt: int, status: AuditStatus, *, error: str | None = None) -> None:
    with session_scope() as session:
        session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.status == AuditStatus.running, Audit.attempts == attempt)
            .values(status=status, error=error, finished_at=utcnow(), heartbeat_at=utcnow())
        )


def mitigation_inputs(mitigation: dict) -> dict:
    """A stored mitigation spec with its run label and effective dual step size."""
    parsed = MitigationSpec(**mitigation)
    return {**mitigation, "label": parsed.label, "step_size": parsed.step_size}


def pipeline_inputs(audit: Audit, output_dir: Path):
    from worker.pipeline import AuditInputs

    spec, dataset = audit.spec, audit.dataset
    train_dataset = object_session(audit).get(Dataset, spec["train_dataset_id"]) if spec["train_dataset_id"] else None
    store = get_store()
    return AuditInputs(
        architecture=audit.model.architecture,
        weights_path=store.blob_path(audit.model.sha256),
        dataset_dir=store.dataset_dir(dataset.id),
        group_by=spec["group_by"],
        group_names={a: dataset.groups[a]["names"] for a in spec["group_by"]},
        ratios=spec["pruning"]["ratios"],
        methods=[{**method, "label": MethodSpec(**method).label} for method in spec["pruning"]["methods"]],
        train_dataset_dir=store.dataset_dir(spec["train_dataset_id"]) if spec["train_dataset_id"] else None,
        output_dir=output_dir,
        seed=spec["seed"],
        batch_size=spec["batch_size"],
        diagnostics=spec["diagnostics"],
        statistics=spec["statistics"],
        device=get_settings().device,
        mitigations=[mitigation_inputs(mitigation) for mitigation in spec.get("mitigations", [])],
        train_group_names={a: train_dataset.groups[a]["names"] for a in spec["group_by"] if a in train_dataset.groups}
        if train_dataset is not None else {},
    )


def attribute_summary(attribute) -> dict:
    """An engine AttributeMetrics as stored on the run: aggregates, and why any of them is null."""
    summary = dataclasses.asdict(attribute)
    for key in ("attribute", "groups", "group_details"):
        summary.pop(key)
    return {
        "n_missing": summary.pop("n_missing"),
        "undefined": summary.pop("undefined"),
        "caveats": summary.pop("caveats"),
        "aggregates": summary,
    }


def group_rows(attribute, figures: dict[str, dict] | None, split: str = "eval") -> list[GroupMetric]:
    """Rows of one attribute; `figures` (diagnostics per group) exist on the evaluation split only."""
    rows = []
    for group, details in zip(attribute.groups, attribute.group_details, strict=True):
        extra = {k: v for k, v in dataclasses.asdict(details).items() if k != "group"}
        diagnostics = figures[group.group] if figures is not None else dict.fromkeys(
            ("dense_gradient_norm", "gradient_norm", "predicted_excessive_loss"))
        rows.append(GroupMetric(
            split=split,
            attribute=attribute.attribute,
            **dataclasses.asdict(group),
            small_group=details.small_group,
            dense_gradient_norm=diagnostics["dense_gradient_norm"],
            gradient_norm=diagnostics["gradient_norm"],
            predicted_excessive_loss=diagnostics["predicted_excessive_loss"],
            details={**extra, **diagnostics},
        ))
    return rows


def render_html(audit: Audit, store) -> str | None:
    """The HTML report, rendered once from the same report the API serves; the JSON stays complete if this fails."""
    from worker.report_html import render_report_html

    try:
        html = render_report_html(assemble_report(audit))
    except Exception:
        log.exception("audit %s: the HTML report could not be rendered", audit.id)
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=store.root / "tmp", delete=False,
                                     encoding="utf-8") as handle:
        handle.write(html)
    return store.add_file(Path(handle.name))


def store_results(audit_id: str, attempt: int, result) -> None:
    store = get_store()
    with session_scope() as session:
        audit = session.get(Audit, audit_id)
        for position, run in enumerate(result.runs):
            weights_sha256 = store.add_file(run.weights_path) if run.weights_path is not None else None
            row = Run(
                audit_id=audit_id, position=position, label=run.label, method=run.method, scope=run.scope,
                ratio=run.ratio, recipe=run.recipe, compression=run.compression, weights_sha256=weights_sha256,
                achieved_sparsity=run.achieved_sparsity, layer_sparsity=run.layer_sparsity, seconds=run.seconds,
                overall=dataclasses.asdict(run.overall), delta_norm=run.delta_norm, notes=run.notes,
                attributes={
                    a.attribute: {**attribute_summary(a), "diagnostics": run.attribute_diagnostics[a.attribute]}
                    for a in run.attributes
                },
                mitigation=run.mitigation, mitigation_details=run.mitigation_details,
                train_overall=dataclasses.asdict(run.train.overall) if run.train else None,
                train_attributes={a.attribute: attribute_summary(a) for a in run.train.attributes}
                if run.train else None,
            )
            for attribute in run.attributes:
                row.group_metrics.extend(group_rows(attribute, run.group_diagnostics[attribute.attribute]))
            for attribute in run.train.attributes if run.train else []:
                row.group_metrics.extend(group_rows(attribute, None, split="train"))
            for group_position, group_row in enumerate(row.group_metrics):
                group_row.position = group_position
            session.add(row)
        audit.environment = result.environment
        session.flush()
        session.expire(audit, ["runs"])
        finished_at = utcnow()
        audit.finished_at = finished_at  # the HTML shows the same finish time as the JSON
        audit.report_html_sha256 = render_html(audit, store)
        # Results and the final state land in one transaction: a report is never half-written.
        finished = session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.status == AuditStatus.running, Audit.attempts == attempt)
            .values(status=AuditStatus.succeeded, progress=1.0, progress_message="done", finished_at=finished_at,
                    heartbeat_at=utcnow())
        )
        if finished.rowcount != 1:
            session.rollback()
            log.info("audit %s left 'running' (or was re-queued) while attempt %d ran; its results are discarded",
                     audit_id, attempt)


@app.task(name=RUN_AUDIT_TASK)
def run_audit(audit_id: str) -> None:
    attempt = claim(audit_id)
    if attempt is None:
        log.info("audit %s is not queued (already claimed or gone); nothing to do", audit_id)
        return
    # torch is imported in the child that runs the task, not in the worker's parent process.
    from worker.engine.errors import EngineError
    from worker.heartbeat import AttemptHeartbeat
    from worker.pipeline import run_audit_pipeline

    settings = get_settings()
    try:
        with AttemptHeartbeat(audit_id, attempt, interval_s=settings.heartbeat_interval_s,
                              max_memory_mb=settings.worker_max_memory_mb):
            with tempfile.TemporaryDirectory(dir=get_store().root / "tmp") as output_dir:
                with session_scope() as session:
                    inputs = pipeline_inputs(session.get(Audit, audit_id), Path(output_dir))
                result = run_audit_pipeline(
                    inputs, lambda fraction, message: report_progress(audit_id, attempt, fraction, message))
                # A last ownership check: an attempt the sweeper replaced while it computed stores nothing.
                report_progress(audit_id, attempt, 1.0, "storing results")
                store_results(audit_id, attempt, result)
    except AttemptSuperseded:
        log.warning("audit %s: attempt %d no longer owns the audit (re-queued or ended); its work is dropped",
                    audit_id, attempt)
    except AuditCancelled:
        finish(audit_id, attempt, AuditStatus.cancelled)
    except EngineError as exc:
        finish(audit_id, attempt, AuditStatus.failed, error=str(exc))
    except SoftTimeLimitExceeded:
        finish(audit_id, attempt, AuditStatus.failed,
               error=f"the audit exceeded the time limit of {settings.audit_time_limit_s} s")
    except MemoryError:
        finish(audit_id, attempt, AuditStatus.failed,
               error="the worker ran out of memory; use a smaller model, dataset or batch_size")
    except Exception as exc:
        log.exception("audit %s failed", audit_id)
        finish(audit_id, attempt, AuditStatus.failed, error=f"internal error: {type(exc).__name__}: {exc}")
