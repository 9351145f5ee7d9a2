"""Every long-running task has an owner (a bridge.service.taskset.TaskSet): the proxy's
webhook workers, the webhooks' delivery lanes and each Server-Sent-Events response's
disconnect watcher are named, a crash is logged by that name, and their owner's stop
leaves none running. And both SSE routes answer with the one response class."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.types import Message

from bridge.http.sse_response import EventStreamResponse
from bridge.proxy.sse import EventStream
from bridge.proxy.subscriptions import RetryPolicy, StreamSubscription, WebhookSubscription
from bridge.service.taskset import Lanes
from callback_server.console.hub import ConsoleClient
from callback_server.console.stream import ConsoleStream
from callback_server.keys import Principal
from tests.support.waiting import eventually_async


def crashed(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.exc_info and name in r.getMessage() and "crashed" in r.getMessage()]


def running(prefix: str) -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks()
                  if t.get_name().startswith(prefix) and not t.done())


async def test_a_webhook_worker_that_dies_is_logged_by_name_and_closed(
        caplog: pytest.LogCaptureFixture) -> None:
    async with httpx.AsyncClient() as client:
        sub = WebhookSubscription("sub1", "a/#", 1, callback_url="http://127.0.0.1:9/",
                                  secret="s", client=client, retry=RetryPolicy(),
                                  queue_size=10)
        assert sub.workers == ["webhook-sub1"]

        async def broken(*_: Any) -> Any:
            raise RuntimeError("mailbox fell over")

        sub.mailbox.get = broken  # type: ignore[method-assign,assignment]
        await eventually_async(lambda: crashed(caplog, "webhook-sub1"),
                               what="the worker's crash in the log")
        await sub.close()
        assert sub.workers == [] and running("webhook-sub1") == []


async def test_delivery_lanes_are_named_and_close_stops_them() -> None:
    started: list[str] = []
    stopped: list[str] = []

    async def deliver(receiver: str, item: int) -> None:
        started.append(receiver)
        try:
            await asyncio.Event().wait()  # a receiver that never answers
        finally:
            stopped.append(receiver)

    lanes: Lanes[str, int] = Lanes(deliver, "webhook")
    lanes.put("a", "A", 1)
    lanes.put("b", "B", 2)
    await eventually_async(lambda: sorted(started) == ["A", "B"], what="both deliveries")
    assert lanes.workers() == ["webhook-a", "webhook-b"] == running("webhook-")
    assert lanes.pending == 2
    await lanes.close()
    assert sorted(stopped) == ["A", "B"] and lanes.workers() == [] == running("webhook-")


class Client:
    """An ASGI client of one SSE response: what it was sent; it leaves on ``leave``."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[Message] = []
        self.left = asyncio.Event()
        self.fail = fail

    async def receive(self) -> Message:
        if self.fail:
            raise RuntimeError("receive fell over")
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent)

    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])


async def serve(response: EventStreamResponse, client: Client) -> asyncio.Task[None]:
    return asyncio.create_task(response({"type": "http"}, client.receive, client.send))


def proxy_stream(closed: list[str]) -> tuple[StreamSubscription, EventStream]:
    sub = StreamSubscription("s1", "a/#", 1, "stream", 10)
    return sub, EventStream(sub, sub.attach_reader(), 30, lambda: closed.append("s1"))


def console_stream(closed: list[str]) -> tuple[ConsoleClient, ConsoleStream]:
    async def nothing() -> AsyncIterator[bytes]:
        yield b": hello\n\n"

    client = ConsoleClient(Principal("k", frozenset({"acme"}), "viewer"))
    return client, ConsoleStream(client, nothing(), 0.01, 30,
                                 on_close=lambda: closed.append("console"))


STREAMS: dict[str, Callable[[list[str]], tuple[Any, EventStreamResponse]]] = {
    "sse-watch-s1": proxy_stream, "console-sse-watch": console_stream}


@pytest.mark.parametrize("watcher", STREAMS)
async def test_a_stream_the_client_leaves_ends_with_its_watcher(watcher: str) -> None:
    closed: list[str] = []
    _, response = STREAMS[watcher](closed)
    client = Client()
    task = await serve(response, client)
    await eventually_async(lambda: client.sent and running(watcher), what="the open stream")
    assert client.headers()[b"content-type"].startswith(b"text/event-stream")
    assert client.headers()[b"cache-control"] == b"no-cache"
    assert client.headers()[b"x-accel-buffering"] == b"no"
    client.left.set()
    await asyncio.wait_for(task, 5)
    assert len(closed) == 1 and running(watcher) == []


@pytest.mark.parametrize("watcher", STREAMS)
async def test_a_watcher_that_dies_is_logged_by_name(
        watcher: str, caplog: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []
    _, response = STREAMS[watcher](closed)
    task = await serve(response, Client(fail=True))
    await eventually_async(lambda: crashed(caplog, watcher), what="the watcher's crash")
    # nobody can tell the client left any more: the stream ends by itself, not at the
    # next failed send (or never, on a quiet stream)
    await asyncio.wait_for(task, 5)
    assert closed and running(watcher) == []
