"""The Server-Sent-Events response of ``GET /console/stream``: one browser's frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from bridge.http.sse_encoder import KEEPALIVE, sse_event
from bridge.http.sse_response import EventStreamResponse
from callback_server.console.hub import ConsoleClient

__all__ = ["ConsoleStream"]


class ConsoleStream(EventStreamResponse):
    """Sends ``first`` (the snapshot, chunk by chunk as it is read), then each batch of
    changes the client gathers, at most one frame per ``frame_seconds``; always runs
    ``on_close``."""

    def __init__(self, client: ConsoleClient, first: AsyncIterator[bytes],
                 frame_seconds: float,
                 keepalive: float, on_close: Callable[[], None]) -> None:
        super().__init__("console-sse-watch", on_close)
        self._client = client
        self._first = first
        self._frame = frame_seconds
        self._keepalive = keepalive

    def client_left(self) -> None:
        self._client.close()

    async def events(self) -> None:
        client = self._client
        async for chunk in self._first:
            if client.closed:
                break
            await self.chunk(chunk)
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
                await self.chunk(chunk)
            # Coalescing: what changes during the pause goes out in the next frame.
            await asyncio.sleep(self._frame)
        await self.end()

    async def finished(self) -> None:
        aclose = getattr(self._first, "aclose", None)
        if aclose is not None:  # a snapshot cut short: its database reads stop too
            await aclose()
