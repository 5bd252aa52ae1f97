"""The API's side of the broker: a Celery client built from settings that sends tasks by name, so the web
process never imports the worker (or torch). The worker's Celery app uses the same configuration."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from service.logs import current_request_id
from service.settings import Settings, get_settings

RUN_AUDIT_TASK = "pruneaudit.run_audit"  # claims the audit, stores the dense baseline, queues the runs
COMPUTE_RUN_TASK = "pruneaudit.compute_run"  # one run of an audit, on any worker
# The message header with the request id of the request that caused the task (worker/celery_app.py reads it).
REQUEST_ID_TASK_HEADER = "pruneaudit_request_id"
DELIVER_WEBHOOK_TASK = "pruneaudit.deliver_webhook"  # one attempt of one webhook delivery (worker/deliveries.py)
LOG_MLFLOW_TASK = "pruneaudit.log_to_mlflow"  # a succeeded audit as an MLflow run (worker/mlflow_task.py)


class SQLiteBrokerTransport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport, polling an empty queue every 0.1 s instead of every 1 s: an idle worker finds a
    task sent to it sooner (the hand-offs of an audit's baseline and runs cost up to 1 s each otherwise). Set here
    because kombu hands every transport option, `polling_interval` too, to SQLAlchemy's create_engine."""

    polling_interval = 0.1


def celery_config(settings: Settings) -> dict:
    transport_options: dict = {}
    broker_url = settings.resolved_broker_url()
    transport: dict = {}
    if broker_url.startswith(("redis://", "rediss://")):
        # An unacked message is redelivered after the visibility timeout: it must outlast the longest task.
        transport_options["visibility_timeout"] = max(settings.audit_time_limit_s, settings.run_time_limit_s) + 600
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    elif broker_url.startswith("sqla+"):
        # kombu hands these to SQLAlchemy's create_engine: wait on SQLite's lock instead of failing fast.
        transport_options["connect_args"] = {"timeout": 30}
        # The transport by its import path (a URL prefix names only kombu's aliases), the URL without the prefix.
        transport = {"broker_transport": f"{__name__}:{SQLiteBrokerTransport.__name__}"}
        broker_url = broker_url.removeprefix("sqla+")
    return {
        **transport,
        "broker_url": broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.queue_name,
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.audit_time_limit_s,
        "task_soft_time_limit": max(settings.audit_time_limit_s - 60, 1),
        # Each run has its own limit: the soft one lets the run fail with the reason, the hard one ends the child.
        "task_annotations": {
            COMPUTE_RUN_TASK: {
                "time_limit": settings.run_time_limit_s,
                "soft_time_limit": max(settings.run_time_limit_s - 60, 1),
            }
        },
        "worker_hijack_root_logger": False,
    }


@lru_cache
def get_celery_client() -> Celery:
    client = Celery("pruneaudit-api")
    client.conf.update(celery_config(get_settings()))
    return client


def declare_queue() -> None:
    """Create the SQLite broker's tables and queue row, once, before the API and workers start: kombu's SQLAlchemy
    transport inserts them on first use, and two processes doing that at once fail (UNIQUE constraint on
    kombu_queue.name), which left an audit's first message unsent. Other brokers declare queues safely."""
    settings = get_settings()
    if not settings.resolved_broker_url().startswith("sqla+"):
        return
    with get_celery_client().connection_for_write() as connection:
        for queue in queue_names(settings):
            connection.default_channel.queue_declare(queue=queue)


def queue_names(settings: Settings) -> list[str]:
    """Every queue a task may wait in: the default one, and the GPU workers' when configured."""
    return [settings.queue_name, *([settings.gpu_queue] if settings.gpu_queue else [])]


def context_headers() -> dict:
    """Message headers carrying the request id of the work that sends the task (service/logs.py)."""
    request_id = current_request_id()
    return {REQUEST_ID_TASK_HEADER: request_id} if request_id else {}


def enqueue_audit(audit_id: str, queue: str | None = None) -> None:
    """Send the task by name (to the default queue unless `queue` says otherwise: the API knows no model's cost,
    worker/placement.py does); call only after the audit row is committed."""
    get_celery_client().send_task(
        RUN_AUDIT_TASK, args=[audit_id], queue=queue or get_settings().queue_name, headers=context_headers()
    )


def enqueue_run(run_id: str, queue: str | None = None) -> None:
    """Send one run's task by name; call only after the run row is committed."""
    get_celery_client().send_task(
        COMPUTE_RUN_TASK, args=[run_id], queue=queue or get_settings().queue_name, headers=context_headers()
    )


def enqueue_delivery(delivery_id: str, countdown: float | None = None) -> None:
    """Send one webhook delivery attempt by name; call only after the delivery row is committed."""
    get_celery_client().send_task(
        DELIVER_WEBHOOK_TASK, args=[delivery_id], queue=get_settings().queue_name, countdown=countdown
    )


def enqueue_mlflow_log(audit_id: str) -> None:
    """Send the MLflow logging of a succeeded audit by name; call only after its end is committed."""
    get_celery_client().send_task(LOG_MLFLOW_TASK, args=[audit_id], queue=get_settings().queue_name)
