"""One settings object for every process. Embedded defaults need no server: SQLite for the database,
Celery over kombu's SQLAlchemy transport on SQLite for the broker, a directory for blobs."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRUNEAUDIT_", extra="ignore")

    var_dir: Path = Field(Path("var"), description="Where embedded defaults keep their files.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under var_dir.")
    broker_url: str | None = Field(None, description="Celery broker URL; default SQLite under var_dir.")
    broker_key_prefix: str = Field("", description="Redis key prefix, so tenants of one Redis stay apart.")
    blob_dir: Path | None = Field(None, description="Content-addressed blob store; default var_dir/blobs.")
    queue_name: str = "pruneaudit"
    max_upload_bytes: int = 512 * 1024 * 1024
    audit_time_limit_s: int = 3600
    max_runs: int = Field(50, description="Most runs (ratios × methods) one audit may ask for.")
    max_parameters: int = Field(200_000_000, description="Largest model (trainable parameters) accepted for upload.")
    device: str = Field("auto", description="Torch device for workers: auto (CUDA when present), cpu, cuda.")
    host: str = "127.0.0.1"
    port: int = 8000

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'pruneaudit.sqlite').resolve()}"

    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.var_dir / 'broker.sqlite').resolve()}"

    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.var_dir / "blobs").resolve()


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    return settings
