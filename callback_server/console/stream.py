"""The Server-Sent-Events response of ``GET /console/stream``: one browser's frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from bridge.http.sse_encoder import KEEPALIVE, sse_event
from callback_server.console.hub import ConsoleClient

__all__ = ["ConsoleStream"]


class ConsoleStream(Response):
    """Sends ``first`` (the snapshot, chunk by chunk as it is read), then each batch of
    changes the client gathers, at most one frame per ``frame_seconds``; notices the
    browser leaving by itself and always runs ``on_close``."""

    media_type = "text/event-stream"

    def __init__(self, client: ConsoleClient, first: AsyncIterator[bytes],
                 frame_seconds: float,
                 keepalive: float, on_close: Callable[[], None]) -> None:
        self.status_code = 200
        self.background = None
        self._client = client
        self._first = first
        self._frame = frame_seconds
        self._keepalive = keepalive
        self._on_close = on_close
        # No body attribute: no Content-Length; X-Accel-Buffering stops nginx buffering.
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self._client

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            client.close()

        watcher = asyncio.create_task(watch(), name="console-sse-watch")
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            async for chunk in self._first:
                if client.closed:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            while not client.closed:
                try:
                    async with asyncio.timeout(self._keepalive):
                        await client.wake.wait()
                except TimeoutError:
                    chunk = KEEPALIVE
                else:
                    if client.closed:
                        break
                    chunk = b"".join(sse_event(kind, items)
                                     for kind, items in client.take().items())
                    client.frames += 1
                if not client.alive():  # signed out or expired while streaming
                    break
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                # Coalescing: what changes during the pause goes out in the next frame.
                await asyncio.sleep(self._frame)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # ASGI >= 2.4 servers raise on send() once the client has gone
        finally:
            self._on_close()
            aclose = getattr(self._first, "aclose", None)
            if aclose is not None:  # a snapshot cut short: its database reads stop too
                await aclose()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
