"""A client generated from the running API's OpenAPI document drives an audit end to end: openapi-python-client
generates a package from /openapi.json of a real API process (with a real worker), and the test uploads the
digits model and data, queues an audit, follows it to `succeeded` and reads its report through that package alone.
Errors come back typed as problem+json (`Problem`), headers as declared (Location, ETag)."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import start_stack

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("client"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client_package(stack, tmp_path_factory):
    """The generated package `pruneaudit_client`, imported from a fresh directory."""
    root = tmp_path_factory.mktemp("generated")
    document = root / "openapi.json"
    document.write_text(httpx.get(f"{stack.url}/openapi.json").text)
    result = subprocess.run(
        [str(VENV_BIN / "openapi-python-client"), "generate", "--path", str(document), "--meta", "none"]
        + ["--output-path", str(root / "pruneaudit_client")],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("pruneaudit_client")
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name.startswith("pruneaudit_client")]:
            del sys.modules[name]


def test_a_generated_client_runs_an_audit_end_to_end(stack, client_package, digits_case):
    from pruneaudit_client.api.audits import create_audit, read_audit, read_report
    from pruneaudit_client.api.datasets import upload_dataset
    from pruneaudit_client.api.models import read_model, upload_model
    from pruneaudit_client.models import AuditSpec, BodyUploadDataset, BodyUploadModel, Problem
    from pruneaudit_client.types import File

    client = client_package.AuthenticatedClient(
        base_url=stack.url, token=stack.api_key, prefix="", auth_header_name="X-API-Key", timeout=httpx.Timeout(120)
    )
    model = upload_model.sync(
        client=client,
        body=BodyUploadModel(
            weights=File(payload=io.BytesIO(digits_case.weights), file_name="model.safetensors"),
            architecture=json.dumps(digits_case.architecture),
        ),
    )
    dataset = upload_dataset.sync(
        client=client, body=BodyUploadDataset(file=File(payload=io.BytesIO(digits_case.npz()), file_name="eval.npz"))
    )
    assert model.parameter_count == sum(v.size for v in digits_case.state.values())
    assert dataset.rows == len(digits_case.y)

    missing = read_model.sync_detailed(client=client, model_id="0" * 32)
    assert missing.status_code == 404 and isinstance(missing.parsed, Problem) and missing.parsed.status == 404

    spec = AuditSpec.from_dict(
        {
            "model_id": model.id,
            "dataset_id": dataset.id,
            "group_by": ["digit"],
            "pruning": {"ratios": [0.5, 0.9], "methods": [{"method": "magnitude", "scope": "global"}]},
            "diagnostics": {"curvature": "off"},
            "statistics": {"bootstrap_resamples": 0},
        }
    )
    created = create_audit.sync_detailed(client=client, body=spec)
    assert created.status_code == 202, created.content
    assert created.headers["location"].endswith(f"/v1/audits/{created.parsed.id}")
    deadline = time.monotonic() + 180
    audit = created.parsed
    while audit.status.value in ("queued", "running"):
        assert time.monotonic() < deadline, audit
        time.sleep(0.5)
        audit = read_audit.sync(client=client, audit_id=created.parsed.id)
    assert audit.status.value == "succeeded", audit

    served = read_report.sync_detailed(client=client, audit_id=audit.id)
    assert served.status_code == 200 and served.headers["etag"]
    report = served.parsed
    raw = httpx.get(f"{stack.url}/v1/audits/{audit.id}/report", headers={"X-API-Key": stack.api_key}).json()
    assert [run.ratio for run in report.runs] == [0.5, 0.9]
    # The typed objects carry the served numbers: the dense per-group accuracy of every digit.
    typed = {group.group: group.accuracy for group in report.dense.attributes[0].groups}
    assert typed == {group["group"]: group["accuracy"] for group in raw["dense"]["attributes"][0]["groups"]}
    assert report.verdict.summary == raw["verdict"]["summary"]
