"""schemathesis against the served OpenAPI document: for every operation, generated valid and invalid
requests (bounded, derandomized, no shrinking) never get a 5xx, and every response is one the document
declares — status code, content type, headers and body schema."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from tests.integration.stack import start_stack

# Bounded for `make test` (about 40 s); raise it for a deeper run, e.g. PRUNEAUDIT_FUZZ_EXAMPLES=500.
EXAMPLES = int(os.environ.get("PRUNEAUDIT_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("openapi-fuzz"))
    yield stack
    stack.stop()


# The document is built from the app's code at collection time (building it touches no database);
# the requests go to the real server, which must serve this same document (checked below).
# (schemathesis.pytest.from_fixture would fetch it from the server, but breaks on pytest 9.)
DOCUMENT = create_app().openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_server_serves_the_fuzzed_document(served):
    with served.client() as client:
        assert client.get("/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_conforms_and_never_5xx(case, served):
    # The security scheme is a required header to schemathesis: where it generated one, send a real key so the
    # request reaches the handler; where a negative case left it out, it stays out (and must get a 401).
    if case.headers and "X-API-Key" in case.headers:
        case.headers["X-API-Key"] = served.api_key
    case.call_and_validate(base_url=served.url, checks=CHECKS)


def test_fuzz_left_the_service_healthy(served):
    """Runs after the generated requests: the processes are up and the worker log holds no traceback."""
    with served.client() as client:
        assert client.get("/readyz").status_code == 200
    assert all(process.poll() is None for process in served.processes.values())
    assert "Traceback" not in served.log("api"), served.log("api")[-4000:]
