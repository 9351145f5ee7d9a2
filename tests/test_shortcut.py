"""The shortcut app: a busy route answered without FastAPI's machinery, errors in the one
body shape all the same, every other request through FastAPI as before."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi import Request, Response

from bridge.errors import AuthError, MalformedBodyError
from bridge.http.error_boundary import install
from bridge.http.shortcut import ShortcutApp


def _app() -> ShortcutApp:
    app = ShortcutApp()
    install(app)
    app.state.answer = b"shortcut"

    @app.post("/busy")
    async def declared() -> Response:  # for the docs: never reached while the shortcut is
        return Response(b"router")

    @app.get("/busy")
    async def read() -> Response:
        return Response(b"router get")

    async def busy(request: Request) -> Response:
        what = request.headers.get("x-what")
        if what == "bad":
            raise MalformedBodyError("body is not JSON", field="body")
        if what == "auth":
            raise AuthError("missing or invalid key")
        if what == "bug":
            raise RuntimeError("a bug")
        return Response(request.app.state.answer + await request.body())

    app.shortcut("POST", "/busy", busy)
    return app


def _call(*requests: tuple[str, dict[str, str]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.request(method, "/busy", headers=headers, content=b"!")
                    for method, headers in requests]
    return asyncio.run(go())


def test_the_shortcut_answers_its_route_and_fastapi_the_rest() -> None:
    post, get = _call(("POST", {}), ("GET", {}))
    assert (post.status_code, post.content) == (200, b"shortcut!")
    assert (get.status_code, get.content) == (200, b"router get")


def test_errors_on_the_shortcut_take_the_one_body_shape(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        bad, auth, bug = _call(("POST", {"x-what": "bad"}), ("POST", {"x-what": "auth"}),
                               ("POST", {"x-what": "bug"}))
    assert bad.status_code == 400
    assert bad.json() | {"timestamp": 0} == {"status": "error", "message": "body is not JSON",
                                             "field": "body", "timestamp": 0}
    assert auth.status_code == 401 and auth.json()["status"] == "error"
    assert bug.status_code == 500
    assert bug.json()["message"] == "internal error"
    assert "a bug" in caplog.text  # the traceback is logged, not sent
