"""One settings object for every process. Embedded defaults need no server: SQLite for the database,
Celery over kombu's SQLAlchemy transport on SQLite for the broker, a directory for blobs."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.ingest import limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRUNEAUDIT_", extra="ignore")

    var_dir: Path = Field(Path("var"), description="Where embedded defaults keep their files.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under var_dir.")
    broker_url: str | None = Field(None, description="Celery broker URL; default SQLite under var_dir.")
    broker_key_prefix: str = Field("", description="Redis key prefix, so tenants of one Redis stay apart.")
    blob_dir: Path | None = Field(None, description="Content-addressed blob store; default var_dir/blobs.")
    queue_name: str = "pruneaudit"
    max_upload_bytes: int = 512 * 1024 * 1024
    # What reading one upload may cost the API process, checked before anything is allocated
    # (service/ingest/limits.py; README "Upload limits").
    max_decoded_bytes: int = Field(
        limits.MAX_DECODED_BYTES,
        ge=1,
        description="Most bytes one dataset may decode to (an .npz's arrays as their headers declare them, twice "
        "a CSV's size): more is 413, refused before decompressing.",
    )
    max_decoding_bytes: int = Field(
        limits.MAX_DECODING_BYTES,
        ge=1,
        description="Most bytes the datasets being decoded at once in one API process may take (each reserves twice "
        "its decoded bytes); an upload waits decode_wait_s for room, then gets 503.",
    )
    decode_wait_s: float = Field(limits.DECODE_WAIT_S, ge=0, description="How long an upload waits for room to decode.")
    max_columns: int = Field(
        limits.MAX_COLUMNS, ge=1, description="Most columns a CSV dataset may have, and most names in 'features'."
    )
    max_safetensors_header_bytes: int = Field(
        limits.MAX_HEADER_BYTES, ge=8, description="Largest safetensors header (JSON) accepted."
    )
    max_tensors: int = Field(limits.MAX_TENSORS, ge=1, description="Most tensors a weights file may hold.")
    max_tensor_name_bytes: int = Field(
        limits.MAX_TENSOR_NAME_BYTES, ge=1, description="Longest tensor name (or other header key) accepted."
    )
    audit_time_limit_s: int = Field(
        3600, ge=1, description="Time limit of an audit's first task: loading it and measuring the dense baseline."
    )
    run_time_limit_s: int = Field(
        3600, ge=1, description="Time limit of each run (one method × ratio × mitigation), a task of its own."
    )
    max_runs: int = Field(50, description="Most runs (ratios × methods) one audit may ask for.")
    max_parameters: int = Field(200_000_000, description="Largest model (trainable parameters) accepted for upload.")
    device: str = Field("auto", description="Torch device for workers: auto (CUDA when present), cpu, cuda.")
    # GPU workers (worker/placement.py): heavy baselines and runs go to this queue, which `pruneaudit worker --gpu`
    # takes besides the default one. Empty: one queue, every worker takes everything.
    gpu_queue: str = Field("", description="Queue of the heavy tasks, taken by GPU workers (empty: none).")
    gpu_min_work_macs: float = Field(
        1e11,
        ge=0,
        description="A baseline or run whose work (multiply-accumulates of its forward passes, 3 per training "
        "example) reaches this goes to gpu_queue.",
    )
    worker_gpu: bool = Field(False, description="This worker takes gpu_queue (set by `pruneaudit worker --gpu`).")
    # Crash safety (service/recovery.py, worker/heartbeat.py).
    heartbeat_interval_s: float = Field(30.0, gt=0, description="How often a running audit's worker beats.")
    heartbeat_timeout_s: float = Field(
        300.0, gt=0, description="A running audit with no heartbeat for this long lost its worker: re-queued."
    )
    max_attempts: int = Field(
        3, ge=1, description="Attempts before an audit (its baseline, or one run) whose worker keeps vanishing fails."
    )
    sweep_interval_s: float = Field(30.0, gt=0, description="How often `pruneaudit sweeper` looks for audits.")
    leftover_age_s: float = Field(
        6 * 3600.0,
        gt=0,
        description="A temporary file, or a dataset directory without its row, unchanged this long is a crash's "
        "leftover: the sweeper removes it (at once when the process of this host that made it is gone; see "
        "service/janitor.py). Keep it above the longest task (run_time_limit_s, audit_time_limit_s).",
    )
    requeue_queued_after_s: float = Field(
        60.0, gt=0, description="A queued audit this old with no message in the broker (lost) is enqueued again."
    )
    worker_max_tasks_per_child: int = Field(
        20, ge=1, description="A worker child is replaced after this many tasks (baselines and runs)."
    )
    worker_max_memory_mb: int = Field(
        16384,
        ge=0,
        description="Resident memory cap of a worker child (MiB; 0 = none): an audit above it fails "
        "with the reason and the child is replaced.",
    )
    # Rate limit per API key (service/ratelimit.py): `burst` requests per moving window of burst / per_s seconds,
    # counted in Redis when the broker is Redis (shared by every API process), in memory otherwise. 0 turns it off.
    rate_limit_per_s: float = Field(10.0, ge=0, description="Average requests a second per API key (0 = no limit).")
    rate_limit_burst: int = Field(60, ge=0, description="Requests an API key may send at once (0 = no limit).")
    api_threads: int = Field(
        40,
        ge=1,
        le=1000,
        description="Request threads of an API process, and its database "
        "connection pool (one connection a thread; see service/db.py).",
    )
    # Schedules (service/schedules.py), fired by the sweeper.
    min_schedule_interval_s: float = Field(
        60.0, gt=0, description="Shortest interval (or cron period) a schedule may have."
    )
    schedule_late_after_s: float = Field(
        60.0, gt=0, description="A firing this long after its tick (the sweeper was down) is marked late."
    )
    # Webhooks (service/webhooks.py, worker/deliveries.py).
    public_url: str | None = Field(
        None, description="The API's address as clients reach it, for report links in webhook payloads."
    )
    webhook_refuse_private_urls: bool = Field(
        True, description="Refuse webhook URLs that resolve to loopback, private, link-local or reserved addresses."
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="Time limit of one delivery attempt.")
    webhook_backoff_base_s: float = Field(5.0, gt=0, description="Delay before the first retry; doubles per attempt.")
    webhook_backoff_max_s: float = Field(600.0, gt=0, description="Longest delay between two attempts.")
    webhook_retry_window_s: float = Field(
        86400.0, gt=0, description="A delivery not accepted within this long after its event is given up (failed)."
    )
    webhook_resend_after_s: float = Field(
        60.0, gt=0, description="A pending delivery this far past its attempt time has lost its message: sent again."
    )
    # MLflow (service/mlflow_log.py, worker/mlflow_task.py; the `mlflow` extra): every succeeded audit logged as a run.
    mlflow_tracking_uri: str | None = Field(
        None, description="When set, workers log each audit that succeeds to this MLflow tracking URI."
    )
    mlflow_experiment: str = Field("pruneaudit", max_length=200, description="The MLflow experiment of those runs.")
    # Retention (service/retention.py), applied by the sweeper.
    audit_retention_days: float | None = Field(
        None, gt=0, description="Ended audits that finished longer ago than this are deleted (unset: kept forever)."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    # Operations (service/logs.py, service/metrics.py, service/routes/health.py).
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or one JSON object each.")
    metrics_token: str = Field("", description="When set, GET /metrics needs Authorization: Bearer <token>.")
    readiness_timeout_s: float = Field(2.0, gt=0, description="How long /readyz waits for the broker to answer.")
    # Timeouts and other limits (README "Security and reliability"): a stuck peer costs a 503 or a closed
    # connection, never a held request thread.
    database_connect_timeout_s: int = Field(
        5, ge=2, description="Longest wait for a PostgreSQL connection to open (libpq's connect_timeout; 2 at least)."
    )
    database_statement_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest a statement may run (PostgreSQL statement_timeout) or wait for a lock (SQLite busy "
        "timeout); past it the request answers 503. Migrations have none.",
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="A connection's request line and headers must arrive within this long, or it is closed."
    )
    http_keep_alive_timeout_s: int = Field(5, ge=1, description="An idle keep-alive connection is closed after this.")
    http_max_header_bytes: int = Field(
        16384, ge=1024, description="Largest request line + headers (h11); larger ones are refused with 400."
    )
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for the next chunk of a request body; then 408 and the connection closes."
    )
    body_total_timeout_s: float = Field(
        900.0, gt=0, description="A whole request body must arrive within this long (a 512 MiB upload at ~0.6 MB/s)."
    )

    @model_validator(mode="after")
    def _heartbeats_beat_the_timeout(self) -> Settings:
        # Two missed heartbeats must not yet look like a dead worker.
        if self.heartbeat_interval_s * 2 > self.heartbeat_timeout_s:
            raise ValueError("heartbeat_interval_s must be at most half of heartbeat_timeout_s")
        return self

    def resolved_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'pruneaudit.sqlite').resolve()}"

    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.var_dir / 'broker.sqlite').resolve()}"

    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.var_dir / "blobs").resolve()

    def ingest_limits(self) -> limits.IngestLimits:
        """The upload readers' caps, from these settings."""
        return limits.IngestLimits(
            max_decoded_bytes=self.max_decoded_bytes,
            max_columns=self.max_columns,
            max_header_bytes=self.max_safetensors_header_bytes,
            max_tensors=self.max_tensors,
            max_tensor_name_bytes=self.max_tensor_name_bytes,
        )


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    return settings
