"""The MLflow run of a succeeded audit, logged by a worker when PRUNEAUDIT_MLFLOW_TRACKING_URI is set: sent once,
by whichever process claims the audit's end (service/events.py), after that claim is committed. At least once: a
redelivered message logs a second run; a lost one logs none (`pruneaudit mlflow-log AUDIT_ID` logs it by hand).
A failure is logged and never touches the audit, whose report stands on its own."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from service.audits import assemble_report, report_csv
from service.db import session_scope
from service.mlflow_log import ReportFiles, log_report
from service.models import Audit, AuditStatus
from service.queue import LOG_MLFLOW_TASK
from service.settings import get_settings
from service.storage import get_store
from worker.celery_app import app

log = logging.getLogger(__name__)


def report_files(audit_id: str) -> ReportFiles | None:
    """What `GET …/report`, `report.csv` and `report.html` serve; None when the audit is gone or not succeeded."""
    with session_scope() as session:
        audit = session.scalars(select(Audit).where(Audit.id == audit_id).options(selectinload(Audit.runs))).first()
        if audit is None or audit.status != AuditStatus.succeeded:
            return None
        report = assemble_report(audit)
        html_sha256 = audit.report_html_sha256
    html = get_store().blob_path(html_sha256).read_text(encoding="utf-8") if html_sha256 else None
    return ReportFiles(report=report.model_dump(mode="json"), csv=report_csv(report), html=html)


@app.task(name=LOG_MLFLOW_TASK)
def log_to_mlflow(audit_id: str) -> None:
    settings = get_settings()
    if not settings.mlflow_tracking_uri:
        return
    try:
        files = report_files(audit_id)
        if files is None:
            log.info("audit %s: not logged to MLflow (deleted, or not succeeded)", audit_id)
            return
        run_id = log_report(settings.mlflow_tracking_uri, settings.mlflow_experiment, files)
    except Exception:
        log.exception("audit %s: could not log it to MLflow (%s)", audit_id, settings.mlflow_tracking_uri)
        return
    log.info("audit %s: logged to MLflow as run %s of %r", audit_id, run_id, settings.mlflow_experiment)
