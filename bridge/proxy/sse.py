"""The Server-Sent-Events response of ``GET /mqtt/stream``: one subscription's messages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from bridge.http.sse_encoder import KEEPALIVE, sse_event
from bridge.proxy.subscriptions import StreamSubscription, message_json

__all__ = ["EventStream"]


class EventStream(Response):
    """A Server-Sent-Events response that notices the client leaving.

    It watches ``receive`` for ``http.disconnect`` itself (whatever the server's ASGI
    version) and always runs ``on_close``, so the broker subscription is released. It
    ends, leaving the buffered messages, when a newer reader of its subscription (a
    reconnecting client) replaces ``reader``, and once ``allowed()`` turns false (the
    caller's key was removed or no longer covers the filter; checked before each message
    and keep-alive).
    """

    media_type = "text/event-stream"

    def __init__(self, sub: StreamSubscription, reader: object, keepalive: float,
                 on_close: Callable[[], None],
                 allowed: Callable[[], bool] = lambda: True) -> None:
        self.status_code = 200
        self._allowed = allowed
        self.background = None
        self._sub = sub
        self._reader = reader
        self._keepalive = keepalive
        self._on_close = on_close
        # No body attribute: no Content-Length; X-Accel-Buffering stops nginx buffering.
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self._sub
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            sub.mailbox.wake()

        watcher = asyncio.create_task(watch(), name=f"sse-watch-{sub.id}")
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            hello = sse_event("subscribed", {"id": sub.id, "topic": sub.filter})
            await send({"type": "http.response.body", "body": hello, "more_body": True})
            reported = sub.mailbox.dropped

            def current() -> bool:
                return sub.reader is self._reader

            end = {"type": "http.response.body", "body": b"", "more_body": False}
            while not gone:
                message = None
                try:
                    async with asyncio.timeout(self._keepalive):
                        message = await sub.mailbox.get(current)
                except TimeoutError:
                    chunk = KEEPALIVE
                else:
                    if gone:
                        break
                    if message is None:
                        if not sub.mailbox.closed and current():
                            continue
                        # Unsubscribed, the proxy is stopping, or a newer reader took
                        # over: end the response.
                        await send(end)
                        break
                    chunk = b""
                    if sub.mailbox.dropped != reported:
                        reported = sub.mailbox.dropped
                        chunk = sse_event("dropped", {"dropped": reported})
                    chunk += sse_event("message", message_json(message))
                if not self._allowed():  # the key was removed, or covers the filter no more
                    await send(end)
                    break
                if message is not None:
                    sub.delivered += 1
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:
            pass  # ASGI >= 2.4 servers raise on send() once the client has gone
        finally:
            self._on_close()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
