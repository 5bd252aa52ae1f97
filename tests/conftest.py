from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

POSTGRES_ADMIN_URL = os.environ.get("PRUNEAUDIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PRUNEAUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class DigitsCase:
    """A small MLP trained on scikit-learn digits and its held-out split, as files a client uploads."""

    architecture: dict
    weights: bytes
    state: dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray

    def npz(self, **extra) -> bytes:
        buffer = io.BytesIO()
        arrays = {"x": self.x, "y": self.y, "group_digit": self.y, **extra}
        np.savez(buffer, **{k: v for k, v in arrays.items() if v is not None})
        return buffer.getvalue()

    def upload_model(self, client, weights: bytes | None = None, architecture: dict | None = None):
        return client.post(
            "/v1/models",
            files={"weights": ("model.safetensors", weights if weights is not None else self.weights)},
            data={"architecture": json.dumps(architecture or self.architecture)},
        )

    def upload_train_dataset(self, client):
        """The training split, for fine-tuning and gradual pruning."""
        return self.upload_dataset(client, self.npz(x=self.x_train, y=self.y_train, group_digit=self.y_train))

    def upload_dataset(self, client, content: bytes | None = None, filename: str = "eval.npz", **form):
        return client.post(
            "/v1/datasets", files={"file": (filename, content if content is not None else self.npz())}, data=form
        )


@pytest.fixture(scope="session")
def digits_case() -> DigitsCase:
    from safetensors.torch import save

    from worker.demo import ARCHITECTURE, train_digits_model

    splits = train_digits_model(seed=0)
    state = {k: v.detach().contiguous() for k, v in splits.model.state_dict().items()}
    return DigitsCase(
        architecture=ARCHITECTURE,
        weights=save(state),
        state={k: v.numpy().copy() for k, v in state.items()},
        x=splits.x_eval,
        y=splits.y_eval,
        x_train=splits.x_train,
        y_train=splits.y_train,
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_service(name: str, check) -> None:
    """Redis and PostgreSQL tests skip on a laptop without them, and fail in CI, never skip there."""
    try:
        check()
    except Exception as exc:
        message = f"{name} is not reachable ({exc}); start it (see README) to run this test"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def throwaway_postgres(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database for the duration (SQLAlchemy URL), dropped afterwards."""
    import psycopg

    require_service("PostgreSQL", lambda: psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close())
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url():
    with throwaway_postgres("pruneaudit_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_broker():
    import redis

    require_service("Redis", lambda: redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping())
    prefix = f"pruneaudit-test-{uuid.uuid4().hex[:10]}:"
    yield REDIS_URL, prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
