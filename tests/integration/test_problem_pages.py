"""Problem `type` URIs on a real `pruneaudit api` process: every described type's URI answers 200 with an HTML
page naming it, and the types of real problem answers (401, 404, 405, 422) point at such pages on the API."""

from __future__ import annotations

import httpx
import pytest

from service.problem_types import PROBLEM_TYPES
from tests.integration.stack import start_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("problem-pages"), with_worker=False)
    yield stack
    stack.stop()


def test_every_problem_type_uri_answers_with_its_page(stack):
    for slug, described in [*PROBLEM_TYPES.items(), ("http-405", None)]:
        page = httpx.get(f"{stack.url}/problems/{slug}")
        assert page.status_code == 200, (slug, page.text)
        assert page.headers["content-type"].startswith("text/html")
        assert slug in page.text and (described is None or described.title in page.text)
    missing = httpx.get(f"{stack.url}/problems/no-such-type")
    assert missing.status_code == 404 and missing.json()["type"] == f"{stack.url}/problems/not-found"


def test_real_problems_point_at_their_pages_on_the_api(stack):
    with stack.client() as client:
        answers = {
            "unauthorized": httpx.get(f"{stack.url}/v1/audits"),
            "not-found": client.get("/v1/models/" + "0" * 32),
            "http-405": client.put("/v1/audits"),
            "invalid-input": client.post("/v1/audits", json={}),
        }
    for slug, answer in answers.items():
        type_uri = answer.json()["type"]
        assert type_uri == f"{stack.url}/problems/{slug}", answer.text
        assert httpx.get(type_uri).status_code == 200
