"""The Server-Sent-Events response both streaming routes are made of (``GET /mqtt/stream``,
``GET /console/stream``): what they would otherwise each write again, and drift apart on.

A stream's headers (no Content-Length, no nginx buffering), a watcher task that notices
the client leaving by itself (whatever the server's ASGI version: a send may not raise once
it has gone), ``on_close`` run however the stream ends, and the watcher stopped with it.
The events are the subclass's (:meth:`EventStreamResponse.events`), framed with
bridge/http/sse_encoder.py.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from bridge.service.taskset import TaskSet

__all__ = ["EventStreamResponse"]


class EventStreamResponse(Response):
    """An open ``text/event-stream`` response; a subclass sends its events."""

    media_type = "text/event-stream"

    def __init__(self, watcher: str, on_close: Callable[[], None]) -> None:
        """``watcher``: the disconnect watcher's task name (what a crash log shows);
        ``on_close``: run once the stream ends, for whatever reason."""
        self.status_code = 200
        self.background = None
        self._watcher = watcher
        self._on_close = on_close
        self._send: Send | None = None
        # No body attribute: no Content-Length; X-Accel-Buffering stops nginx buffering.
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def client_left(self) -> None:
        """The client disconnected: wake whatever :meth:`events` waits on, so it ends."""

    async def events(self) -> None:
        """Send the stream (:meth:`chunk`) and, when it ends on its own, :meth:`end`."""
        raise NotImplementedError

    async def finished(self) -> None:
        """After ``on_close``: release what the stream still holds."""

    async def chunk(self, body: bytes) -> None:
        """One piece of the stream (events, or a keep-alive comment)."""
        assert self._send is not None, "chunk() is for events(), while the response runs"
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def end(self) -> None:
        """The stream's last (empty) piece: the client sees the response end."""
        assert self._send is not None, "end() is for events(), while the response runs"
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A set of its own: the watcher waits on ``receive`` for as long as the stream
        # lasts, so an owner's set drained at stop would wait on it for its whole bound.
        watchers = TaskSet("sse")

        async def watch() -> None:
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            finally:  # gone, or the watch failed (logged by its set): either way, end it
                self.client_left()

        watchers.spawn(watch(), self._watcher)
        self._send = send
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            await self.events()
        except OSError:
            pass  # ASGI >= 2.4 servers raise on send() once the client has gone
        finally:
            self._on_close()
            try:
                await self.finished()
            finally:
                await watchers.cancel()
