"""The worker's Celery app: same broker configuration as the API's client (service.queue)."""

from __future__ import annotations

from celery import Celery, Task
from celery.signals import setup_logging, task_postrun, task_prerun, worker_process_init

from service.logs import audit_id_var, configure_logging, request_id_var
from service.queue import REQUEST_ID_TASK_HEADER, RUN_AUDIT_TASK, celery_config
from service.settings import get_settings

app = Celery("pruneaudit", include=["worker.tasks"])
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


@worker_process_init.connect
def load_the_pipeline(**_: object) -> None:
    """Each pool child imports torch and the pipeline as it starts, before it takes a task, rather than inside its
    first one: measured 5.6 s here (torch 1.4, torch._dynamo — which torch.func pulls in on first use — 1.2, the
    pipeline and report modules 2.0, Torch-Pruning and scipy.stats 1.0) that an audit would otherwise wait for. The
    worker's parent process still never imports torch."""
    import scipy.stats  # noqa: F401
    import torch._dynamo  # noqa: F401

    import worker.pipeline.runner  # noqa: F401
    import worker.placement  # noqa: F401
    import worker.report_html  # noqa: F401
