"""Swagger UI and ReDoc served by the API itself, with their JavaScript and CSS from the installed
`fastapi_offline` package (FastAPI's default pages load them from a CDN, so behind a firewall or offline they
render nothing). Exempt from the rate limit, like /openapi.json."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs/assets"
OPENAPI_URL = "/openapi.json"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
TITLE = "pruneaudit"

# The pages may load only what this server serves: ReDoc's sidebar would fetch its logo from cdn.redoc.ly, which the
# browser now refuses without a request. Inline scripts and styles are the pages' own (their setup, styled-components).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


def _confined(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return _confined(
        get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title=f"{TITLE} — Swagger UI",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
            oauth2_redirect_url=OAUTH2_REDIRECT_URL,
            # The key typed into Authorize survives a reload of the page.
            swagger_ui_parameters={"persistAuthorization": True},
        )
    )


@router.get(OAUTH2_REDIRECT_URL)
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return _confined(
        get_redoc_html(
            openapi_url=OPENAPI_URL,
            title=f"{TITLE} — ReDoc",
            redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )
    )


def install_docs(app: FastAPI) -> None:
    """The two pages and their assets; create the app with docs_url=None and redoc_url=None."""
    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")
