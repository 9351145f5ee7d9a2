"""The Server-Sent-Events response of ``GET /mqtt/stream``: one subscription's messages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bridge.http.sse_encoder import KEEPALIVE, sse_event
from bridge.http.sse_response import EventStreamResponse
from bridge.proxy.subscriptions import StreamSubscription, message_json

__all__ = ["EventStream"]


class EventStream(EventStreamResponse):
    """A subscription's messages as Server-Sent Events.

    Always runs ``on_close``, so the broker subscription is released. It ends, leaving
    the buffered messages, when a newer reader of its subscription (a reconnecting
    client) replaces ``reader``, and once ``allowed()`` turns false (the caller's key was
    removed or no longer covers the filter; checked before each message and keep-alive).
    """

    def __init__(self, sub: StreamSubscription, reader: object, keepalive: float,
                 on_close: Callable[[], None],
                 allowed: Callable[[], bool] = lambda: True) -> None:
        super().__init__(f"sse-watch-{sub.id}", on_close)
        self._allowed = allowed
        self._sub = sub
        self._reader = reader
        self._keepalive = keepalive
        self._gone = False

    def client_left(self) -> None:
        self._gone = True
        self._sub.mailbox.wake()

    def _current(self) -> bool:
        return self._sub.reader is self._reader

    async def events(self) -> None:
        sub = self._sub
        await self.chunk(sse_event("subscribed", {"id": sub.id, "topic": sub.filter}))
        reported = sub.mailbox.dropped
        while not self._gone:
            message = None
            try:
                async with asyncio.timeout(self._keepalive):
                    message = await sub.mailbox.get(self._current)
            except TimeoutError:
                chunk = KEEPALIVE
            else:
                if self._gone:
                    break
                if message is None:
                    if not sub.mailbox.closed and self._current():
                        continue
                    # Unsubscribed, the proxy is stopping, or a newer reader took over:
                    # end the response.
                    await self.end()
                    break
                chunk = b""
                if sub.mailbox.dropped != reported:
                    reported = sub.mailbox.dropped
                    chunk = sse_event("dropped", {"dropped": reported})
                chunk += sse_event("message", message_json(message))
            if not self._allowed():  # the key was removed, or covers the filter no more
                await self.end()
                break
            if message is not None:
                sub.delivered += 1
            await self.chunk(chunk)
