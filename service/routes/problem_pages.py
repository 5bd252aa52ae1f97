"""The pages problem+json `type` URIs point at (service/problem_types.py): what the problem means, what to do."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from markupsafe import escape

from service.errors import NotFound
from service.problem_types import PROBLEMS_PATH, problem_type

router = APIRouter()

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} ({status}) · pruneaudit</title></head>
<body><h1>{title}</h1><p>HTTP status {status} · problem type <code>{slug}</code></p><p>{description}</p>
<p>Answers with this type are <code>application/problem+json</code> (RFC 9457): <code>detail</code> says what
happened to this request, <code>instance</code> which path it was. <a href="/docs">API documentation</a></p>
</body></html>
"""


@router.get(PROBLEMS_PATH + "{slug}", response_class=HTMLResponse, include_in_schema=False)
def read_problem_type(slug: str) -> HTMLResponse:
    """Not in the OpenAPI document: documentation of the API's errors, not an operation of it."""
    described = problem_type(slug)
    if described is None:
        raise NotFound(f"no problem type {slug}")
    fields = {"title": described.title, "status": described.status, "slug": slug, "description": described.description}
    page = PAGE.format(**{name: escape(value) for name, value in fields.items()})
    return HTMLResponse(page, headers={"Cache-Control": "public, max-age=86400"})
