"""The web process stays light: it never imports torch, and its resident memory stays under ~200 MB."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from tests.integration.stack import start_stack, wait_for_audit


def test_importing_the_service_never_imports_torch():
    code = (
        "import sys; import service.app, service.cli, service.queue, service.migrate; "
        "service.app.create_app(); "
        "heavy = [m for m in ('torch', 'worker', 'sklearn', 'safetensors') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("web"))
    yield stack
    stack.stop()


def test_running_api_has_no_torch_and_stays_small(stack, digits_case):
    with stack.client() as client:
        model = digits_case.upload_model(client).json()
        dataset = digits_case.upload_dataset(client).json()
        audit = client.post(
            "/v1/audits", json={"model_id": model["id"], "dataset_id": dataset["id"], "group_by": ["digit"]}
        ).json()
        assert wait_for_audit(client, audit["id"])["status"] == "succeeded"
        for _ in range(20):
            assert client.get(f"/v1/audits/{audit['id']}/report").status_code == 200
    api = psutil.Process(stack.processes["api"].pid)
    processes = [api, *api.children(recursive=True)]
    mapped = {m.path for p in processes for m in p.memory_maps()}
    assert not [path for path in mapped if "libtorch" in path], "the API process loaded torch"
    rss_mb = sum(p.memory_info().rss for p in processes) / 2**20
    assert rss_mb < 200, f"API resident memory {rss_mb:.0f} MB"
