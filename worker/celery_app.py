"""The worker's Celery app: same broker configuration as the API's client (service.queue)."""

from __future__ import annotations

from celery import Celery

from service.queue import celery_config
from service.settings import get_settings

app = Celery("pruneaudit", include=["worker.tasks", "worker.deliveries"])
app.conf.update(celery_config(get_settings()))
