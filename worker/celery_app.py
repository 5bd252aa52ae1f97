"""The worker's Celery app: same broker configuration as the API's client (service.queue)."""

from __future__ import annotations

from celery import Celery, Task
from celery.signals import setup_logging, task_postrun, task_prerun

from service.logs import audit_id_var, configure_logging, request_id_var
from service.queue import REQUEST_ID_TASK_HEADER, RUN_AUDIT_TASK, celery_config
from service.settings import get_settings

app = Celery("pruneaudit", include=["worker.tasks", "worker.deliveries", "worker.mlflow_task"])
app.conf.update(celery_config(get_settings()))


@setup_logging.connect
def use_pruneaudit_logging(loglevel: int | str | None = None, **_: object) -> None:
    """The worker logs like the API (PRUNEAUDIT_LOG_FORMAT, request ids); connected, Celery skips its own setup."""
    configure_logging(get_settings().log_format, loglevel or "INFO")


@task_prerun.connect
def enter_log_context(task: Task | None = None, args: tuple | None = None, **_: object) -> None:
    """The task's log lines carry the request id its message was sent with (service/queue.py), and a baseline task's
    its audit id; prerun and postrun run in the thread that runs the task."""
    if task is None:
        return
    request = task.request
    request_id_var.set(
        getattr(request, REQUEST_ID_TASK_HEADER, None) or (request.headers or {}).get(REQUEST_ID_TASK_HEADER)
    )
    audit_id_var.set(args[0] if task.name == RUN_AUDIT_TASK and args else None)


@task_postrun.connect
def leave_log_context(**_: object) -> None:
    request_id_var.set(None)
    audit_id_var.set(None)
