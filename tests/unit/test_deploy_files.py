"""docker-compose.yml and the Dockerfile run commands that exist; the integration tests run those same
commands (`pruneaudit migrate | api | worker`) as processes, since no Docker engine runs here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_the_stack_with_healthchecks():
    services = compose()["services"]
    assert {"api", "worker", "sweeper", "redis", "postgres", "migrate"} <= services.keys()
    for name in ("api", "redis", "postgres"):
        assert "healthcheck" in services[name]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("service", ["migrate", "api", "worker", "sweeper", "gpu-worker"])
def test_compose_commands_are_real_cli_commands(service):
    command = compose()["services"][service]["command"]
    assert command[0] == "pruneaudit"
    args = build_parser().parse_args(command[1:])
    assert args.command == service.removeprefix("gpu-")


def test_the_gpu_worker_takes_the_gpu_queue_everyone_is_told_of():
    services = compose()["services"]
    args = build_parser().parse_args(services["gpu-worker"]["command"][1:])
    assert args.gpu and services["gpu-worker"]["profiles"] == ["gpu"]
    # API, workers and sweeper must agree on it: the sweeper looks for lost messages in that queue too
    for name in ("api", "worker", "sweeper", "gpu-worker"):
        assert services[name]["environment"]["PRUNEAUDIT_GPU_QUEUE"] == "${PRUNEAUDIT_GPU_QUEUE:-}"


def test_worker_children_have_the_task_and_memory_caps_from_settings(monkeypatch):
    from service.cli import worker_command
    from service.settings import get_settings

    monkeypatch.setenv("PRUNEAUDIT_WORKER_MAX_TASKS_PER_CHILD", "7")
    monkeypatch.setenv("PRUNEAUDIT_WORKER_MAX_MEMORY_MB", "3000")
    get_settings.cache_clear()
    try:
        command = worker_command(2, "INFO")
    finally:
        get_settings.cache_clear()
    assert command[command.index("--max-tasks-per-child") + 1] == "7"
    assert command[command.index("--max-memory-per-child") + 1] == str(3000 * 1024)  # Celery counts KiB


def test_dockerfile_default_command_is_the_api():
    text = (REPO / "Dockerfile").read_text()
    assert 'CMD ["pruneaudit", "api"]' in text
    # the CPU wheel by default; GPU workers pass a CUDA build's version and index
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX_URL}" in text


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_docker_compose_config_validates():
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
