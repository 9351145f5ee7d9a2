"""A FastAPI app that answers its busiest routes without FastAPI's per-request machinery.

On the ingest benches (py-spy) the router's matching, dependency solving and Starlette's
exception middleware took a fifth to a quarter of the samples of a request whose own work
was a like share. A shortcut route is answered from here: the handler gets a plain
``Request`` (``request.app`` is the app, as in a route) and returns a ``Response``; its
errors take the same one body shape as every other route's (``error_boundary``). The
route is still declared on a router for the OpenAPI document, and is reached there only
when the shortcut is bypassed (a mounted sub-app, a test client on the router).

Every shortcut is kept as a ``Direct`` route: the scope and ``receive`` in, the whole
answer out. Served by ``bridge.http.server``, the server answers it itself, without ASGI
messages or middleware (uvicorn's send and our middleware around it were ~8 % of the
edge's samples); served by any other ASGI server, this app sends the answer as usual.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]
#: A direct route's answer: a Response with its whole body (not streamed); bytes for a
#: 200 ``application/json`` body, the busiest answer, built without a Response; None when
#: the client went away before its request was in (nobody to answer).
Answer = Response | bytes | None
Direct = Callable[[Scope, Receive], Awaitable[Answer]]


class ShortcutApp(FastAPI):
    """FastAPI, with ``(method, path)`` pairs answered directly by a handler."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: (method, path) -> route; bridge.http.server answers these without ASGI
        self.direct_routes: dict[tuple[str, str], Direct] = {}

    def shortcut(self, method: str, path: str, handler: Handler) -> None:
        """Answer ``method path`` with ``handler``; what it raises goes to the app's own
        exception handlers (``error_boundary.install``), as a routed request's would."""

        async def answer(scope: Scope, receive: Receive) -> Answer:
            scope["app"] = self
            request = Request(scope, receive)
            try:
                return await handler(request)
            except Exception as exc:
                return await self._handled(request, exc)

        self.direct_routes[(method, path)] = answer

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The answer of the app's handler for ``exc``'s nearest class (Starlette's rule);
        without one, ``exc`` goes on up to the server."""
        for kind in type(exc).__mro__:
            handler = self.exception_handlers.get(kind)
            if handler is not None:
                response = handler(request, exc)
                return await response if inspect.isawaitable(response) else response
        raise exc

    def direct(self, method: str, path: str, route: Direct) -> None:
        """Answer ``method path`` with ``route``, which makes its own error answers."""
        self.direct_routes[(method, path)] = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.direct_routes.get((scope["method"], scope["path"]))
            if route is not None:
                await send_answer(await route(scope, receive), scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def send_answer(answer: Answer, scope: Scope, receive: Receive, send: Send) -> None:
    """A direct route's answer as ASGI messages."""
    if answer is None:
        return
    if isinstance(answer, bytes):
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", b"%d" % len(answer)),
            (b"content-type", b"application/json"),
        ]})
        await send({"type": "http.response.body", "body": answer})
        return
    await answer(scope, receive, send)
