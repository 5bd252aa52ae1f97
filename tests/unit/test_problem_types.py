"""Every problem type the service can raise is described (service/problem_types.py), and http-<status> types are
described for HTTP error statuses only."""

from __future__ import annotations

import pytest

from service.errors import PruneauditError
from service.problem_types import PROBLEM_TYPES, problem_type


def subclasses(kind: type) -> list[type]:
    return [c for sub in kind.__subclasses__() for c in (sub, *subclasses(sub))]


def test_every_error_of_the_hierarchy_has_a_described_type_with_its_status_and_title():
    import service.app  # noqa: F401  (routes define errors of their own, e.g. the readiness ones)

    errors = [PruneauditError, *subclasses(PruneauditError)]
    assert len(errors) >= 8
    for error in errors:
        described = PROBLEM_TYPES.get(error.slug)
        assert described is not None, error
        assert (described.status, described.title) == (error.status, error.title), error


@pytest.mark.parametrize(("slug", "status"), [("http-404", 404), ("http-405", 405), ("http-400", 400)])
def test_starlette_http_errors_have_a_type_per_status(slug, status):
    described = problem_type(slug)
    assert described is not None and described.status == status and described.description


@pytest.mark.parametrize("slug", ["http-200", "http-999", "http-4x", "http-", "nonsense", "../etc"])
def test_anything_else_is_no_problem_type(slug):
    assert problem_type(slug) is None
