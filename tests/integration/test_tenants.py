"""Tenants and API keys on the real stack: another tenant's ids answer 404 on every endpoint, exactly like
missing ones; bad, unknown and revoked keys answer 401; keys are stored hashed; Idempotency-Keys are per tenant."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import httpx
import pytest
import sqlalchemy

from tests.integration.stack import DEPLOYMENTS, REPO, start_deployment, wait_for_audit


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def stack(request, tmp_path_factory):
    """Both deployments: embedded (SQLite + SQLite broker) and real PostgreSQL + Redis."""
    stack = start_deployment(request, tmp_path_factory.mktemp("tenants"))
    yield stack
    stack.stop()


def upload_all(client, digits_case) -> dict:
    return {
        "model_id": digits_case.upload_model(client).json()["id"],
        "dataset_id": digits_case.upload_dataset(client).json()["id"],
        "train_dataset_id": digits_case.upload_train_dataset(client).json()["id"],
    }


SPEC = {
    "group_by": ["digit"],
    "pruning": {"ratios": [0.5]},
    "diagnostics": {"curvature": "off"},
    "statistics": {"bootstrap_resamples": 0},
}


@pytest.fixture(scope="module")
def owned(stack, digits_case):
    """Tenant 'tests' (the stack's key) owns a model, datasets and a succeeded audit."""
    with stack.client() as client:
        ids = upload_all(client, digits_case)
        audit = client.post("/v1/audits", json={**ids, **SPEC}).json()
        audit = wait_for_audit(client, audit["id"])
        assert audit["status"] == "succeeded", audit
        report = client.get(f"/v1/audits/{audit['id']}/report").json()
    return {**ids, "audit": audit, "run_id": report["runs"][0]["id"]}


def tenant_paths(owned: dict) -> list[tuple[str, str]]:
    audit_id = owned["audit"]["id"]
    return [
        ("GET", f"/v1/models/{owned['model_id']}"),
        ("GET", f"/v1/datasets/{owned['dataset_id']}"),
        ("GET", f"/v1/audits/{audit_id}"),
        ("GET", f"/v1/audits/{audit_id}/report"),
        ("GET", f"/v1/audits/{audit_id}/report.csv"),
        ("GET", f"/v1/audits/{audit_id}/report.html"),
        ("GET", f"/v1/audits/{audit_id}/runs/{owned['run_id']}/weights"),
        ("GET", f"/v1/audits/{audit_id}/runs/{owned['run_id']}/recipe"),
        ("POST", f"/v1/audits/{audit_id}/cancel"),
        ("GET", f"/v1/compare?audits={audit_id},{audit_id}"),
    ]


def test_another_tenant_gets_404_on_every_endpoint_as_for_a_missing_id(stack, owned, digits_case):
    other = stack.new_key("other-team")
    audit_id = owned["audit"]["id"]
    with stack.client() as mine, stack.client(other) as theirs:
        for method, path in tenant_paths(owned):
            assert mine.request(method, path).status_code in (200, 409), path  # cancel: 409, it has ended
            response = theirs.request(method, path)
            assert response.status_code == 404, (path, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            # Indistinguishable from an id that does not exist at all.
            missing = theirs.request(
                method,
                path.replace(audit_id, "0" * 32)
                .replace(owned["model_id"], "0" * 32)
                .replace(owned["dataset_id"], "0" * 32),
            )
            assert missing.status_code == 404
            assert response.json()["title"] == missing.json()["title"]
        assert theirs.get("/v1/audits").json()["total"] == 0
        assert mine.get("/v1/audits").json()["total"] >= 1
        # Another tenant's model and dataset ids cannot be audited either.
        borrowed = theirs.post("/v1/audits", json={**{k: owned[k] for k in ("model_id", "dataset_id")}, **SPEC})
        assert borrowed.status_code == 422 and "does not exist" in borrowed.json()["detail"]


@pytest.mark.parametrize("key", [None, "", "pa_", "pa_0123456789abcdef_wrong", "not-a-key", "pa_x_y_z"])
def test_bad_keys_are_401_problems(stack, owned, key):
    headers = {} if key is None else {"X-API-Key": key}
    with httpx.Client(base_url=stack.url, headers=headers) as client:
        for method, path in [
            *tenant_paths(owned),
            ("GET", "/v1/audits"),
            ("GET", "/v1/architectures"),
            ("POST", "/v1/audits"),
        ]:
            response = client.request(method, path, json=SPEC if method == "POST" else None)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_revoked_key_stops_working_and_keys_are_stored_hashed(stack):
    key = stack.new_key("short-lived")
    with stack.client(key) as client:
        assert client.get("/v1/audits").status_code == 200
    key_id, secret = key.removeprefix("pa_").split("_", 1)
    database = sqlalchemy.create_engine(
        stack.env.get("PRUNEAUDIT_DATABASE_URL") or f"sqlite:///{stack.var_dir / 'pruneaudit.sqlite'}"
    )
    with database.connect() as db:
        stored = tuple(db.execute(sqlalchemy.text("SELECT * FROM api_keys WHERE id = :id"), {"id": key_id}).one())
    database.dispose()
    assert secret not in repr(stored) and hashlib.sha256(secret.encode()).hexdigest() in stored
    revoked = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "revoke", key_id],
        env=stack.env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    with stack.client(key) as client:
        assert client.get("/v1/audits").status_code == 401
    with stack.client() as client:  # other keys are unaffected
        assert client.get("/v1/audits").status_code == 200


def test_idempotency_keys_are_per_tenant(stack, digits_case):
    other = stack.new_key("nightly-team")
    created = {}
    for name, key in (("tests", stack.api_key), ("nightly-team", other)):
        with stack.client(key) as client:
            ids = upload_all(client, digits_case)
            first = client.post("/v1/audits", json={**ids, **SPEC}, headers={"Idempotency-Key": "nightly-2026-11-25"})
            again = client.post("/v1/audits", json={**ids, **SPEC}, headers={"Idempotency-Key": "nightly-2026-11-25"})
            assert first.status_code == 202 and again.status_code == 202, (first.text, again.text)
            assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
            created[name] = first.json()["id"]
    assert created["tests"] != created["nightly-team"]


def test_swagger_ui_has_the_authorize_scheme(stack):
    with httpx.Client(base_url=stack.url) as client:
        document = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    assert document["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key from `pruneaudit keys create --tenant NAME`.",
    }
    assert document["paths"]["/v1/audits"]["post"]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in document["paths"]["/healthz"]["get"]
