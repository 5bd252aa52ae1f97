"""Every JSON request body in the served OpenAPI document has an example (what Swagger UI's "Try it out" fills in),
and sent as it is to a real `pruneaudit api` process it passes request validation: the answer is the operation's
own (its example names resources that do not exist here, so e.g. 422 "does not exist" or 404), never a 422 about
the body's shape, never a 5xx."""

from __future__ import annotations

import pytest

from tests.integration.stack import start_stack

# What each example meets on an empty tenant: its named model, dataset or schedule does not exist; the webhook's
# example host does not resolve (ci.example.com) or, where it does, is created.
EXPECTED = {
    ("post", "/v1/audits"): {422},
    ("post", "/v1/schedules"): {422},
    ("patch", "/v1/schedules/{schedule_id}"): {404},
    ("post", "/v1/webhooks"): {201, 422},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("request-examples"), with_worker=False)
    yield stack
    stack.stop()


def json_bodies(document: dict) -> dict[tuple[str, str], dict]:
    """(method, path) → the request body's JSON schema, $ref resolved, for every operation with a JSON body."""
    schemas = document["components"]["schemas"]
    bodies = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                schema = content["application/json"]["schema"]
                bodies[(method, path)] = schemas[schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema
    return bodies


def test_every_json_request_body_example_passes_validation_as_it_is(stack):
    with stack.client() as client:
        bodies = json_bodies(client.get("/openapi.json").json())
        assert set(bodies) == set(EXPECTED), "a new JSON body: add it here with what its example meets"
        for (method, path), schema in bodies.items():
            assert schema.get("examples"), f"{method.upper()} {path} has no example"
            answer = client.request(method, path.replace("{schedule_id}", "0" * 32), json=schema["examples"][0])
            problem = answer.json()
            shape_errors = [e for e in problem.get("errors", []) if e.get("loc", [None])[0] == "body"]
            assert not shape_errors and answer.status_code in EXPECTED[(method, path)], (method, path, problem)
