"""API docs that work offline: Swagger UI and ReDoc from the app itself, not a CDN.

FastAPI's ``/docs`` and ``/redoc`` pages load their scripts from a public CDN, so they
are blank on a gateway without internet. ``install_docs`` serves the vendored copies
(``bridge/static/docs``, licences beside them) and points both pages at them.

Both pages carry a Content-Security-Policy: scripts only from this host plus, by hash,
the one inline script that starts Swagger UI (computed from the page itself, so a FastAPI
upgrade that changes it cannot silently break or loosen the policy); styles inline too
(both UIs set styles at run time); ReDoc's search worker from a ``blob:``; no framing.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS", "docs_policy", "event_stream", "install_docs"]

ASSETS = Path(__file__).resolve().parents[1] / "static" / "docs"
_PREFIX = "/static/docs"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


#: One Server-Sent Event as OpenAPI 3.2's ``itemSchema`` describes it: a named event
#: whose ``data`` is one line of JSON (``schema``: the stream, read as their array).
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {"event": {"type": "string"},
                   "data": {"type": "string", "contentMediaType": "application/json"},
                   "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}}}


def event_stream(description: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a Server-Sent-Events route's 200 (with ``response_class`` its
    ``text/event-stream`` response class, so the docs name no JSON body)."""
    return {200: {"description": description, "content": {"text/event-stream": {
        "schema": {"type": "array", "items": _SSE_EVENT}, "itemSchema": _SSE_EVENT}}}}


def docs_policy(page: bytes) -> str:
    """The CSP of a docs page: its inline scripts allowed by hash, nothing else inline."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"
        for body in _INLINE_SCRIPT.findall(page))
    return ("default-src 'self'; "
            f"script-src 'self'{' ' + hashes if hashes else ''}; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "worker-src 'self' blob:; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = docs_policy(bytes(page.body))
    page.headers["X-Content-Type-Options"] = "nosniff"
    return page


#: ``/docs`` and ``/redoc``; each page names the app that serves it.
router = APIRouter()


def install_docs(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` on ``app`` (created with ``docs_url=None, redoc_url=None``)."""
    app.mount(_PREFIX, StaticFiles(directory=ASSETS), name="docs-assets")
    app.include_router(router)


@router.get("/docs", include_in_schema=False)
async def swagger(request: Request) -> HTMLResponse:
    app = request.app
    return _with_policy(get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - docs",
        swagger_js_url=f"{_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{_PREFIX}/favicon-32x32.png"))


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    app = request.app
    return _with_policy(get_redoc_html(
        openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - ReDoc",
        redoc_js_url=f"{_PREFIX}/redoc.standalone.js",
        redoc_favicon_url=f"{_PREFIX}/favicon-32x32.png", with_google_fonts=False))
