"""The OpenAPI document as client generators need it (service/openapi.py), read from the app itself."""

from __future__ import annotations

from service.app import create_app

METHODS = {"get", "post", "put", "patch", "delete"}


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def test_operation_ids_are_the_route_function_names_and_unique():
    document = create_app().openapi()
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))
    # FastAPI's default appends the path and method (read_model_v1_models__model_id__get)
    assert all(operation_id.isidentifier() and "_v1_" not in operation_id for operation_id in ids), ids
    assert document["paths"]["/v1/audits"]["post"]["operationId"] == "create_audit"
    assert document["paths"]["/v1/audits/{audit_id}/report"]["get"]["operationId"] == "read_report"


def test_every_error_response_is_problem_json_with_the_problem_schema():
    document = create_app().openapi()
    assert "Problem" in document["components"]["schemas"]
    for path, method, operation in operations(document):
        responses = operation["responses"]
        assert {"500", "503"} <= responses.keys(), (method, path)
        for code, response in responses.items():
            if code[0] in "45":
                assert response["content"] == {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                }, (method, path, code)


def test_declared_headers_and_typed_bodies():
    document = create_app().openapi()
    paths = document["paths"]
    assert "Location" in paths["/v1/audits"]["post"]["responses"]["202"]["headers"]
    report = paths["/v1/audits/{audit_id}/report"]["get"]["responses"]
    assert "ETag" in report["200"]["headers"] and "ETag" in report["304"]["headers"]
    recipe = paths["/v1/audits/{audit_id}/runs/{run_id}/recipe"]["get"]["responses"]["200"]
    assert recipe["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RunRecipe"}
    upload = document["components"]["schemas"]["Body_upload_model"]["properties"]["weights"]
    assert upload["format"] == "binary"
