"""A FastAPI app that answers its busiest routes without FastAPI's per-request machinery.

On the ingest benches (py-spy) the router's matching, dependency solving and Starlette's
exception middleware took a fifth to a quarter of the samples of a request whose own work
was a like share. A shortcut route is answered from here: the handler gets a plain
``Request`` (``request.app`` is the app, as in a route) and returns a ``Response``; its
errors take the same one body shape as every other route's (``error_boundary``). The
route is still declared on a router for the OpenAPI document, and is reached there only
when the shortcut is bypassed (a mounted sub-app, a test client on the router).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]
ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]


class ShortcutApp(FastAPI):
    """FastAPI, with ``(method, path)`` pairs answered directly by a handler."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shortcuts: dict[tuple[str, str], ASGI] = {}

    def shortcut(self, method: str, path: str, handler: Handler) -> None:
        """Answer ``method path`` with ``handler``; what it raises goes to the app's own
        exception handlers (``error_boundary.install``), as a routed request's would."""

        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            try:
                response = await handler(request)
            except Exception as exc:
                response = await self._handled(request, exc)
            await response(scope, receive, send)

        self.shortcuts[(method, path)] = answer

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The answer of the app's handler for ``exc``'s nearest class (Starlette's rule);
        without one, ``exc`` goes on up to the server."""
        for kind in type(exc).__mro__:
            handler = self.exception_handlers.get(kind)
            if handler is not None:
                response = handler(request, exc)
                return await response if inspect.isawaitable(response) else response
        raise exc

    def raw_shortcut(self, method: str, path: str, app: ASGI) -> None:
        """Answer ``method path`` with an ASGI callable that sends its own errors."""
        self.shortcuts[(method, path)] = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.shortcuts.get((scope["method"], scope["path"]))
            if handler is not None:
                scope["app"] = self
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
