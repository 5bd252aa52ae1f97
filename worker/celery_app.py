"""The worker's Celery app: same broker configuration as the API's client (service.queue)."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from service.queue import celery_config
from service.settings import get_settings

app = Celery("pruneaudit", include=["worker.tasks"])
app.conf.update(celery_config(get_settings()))


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
