"""What one hostile client can hold of a listener: bounded in time, and nothing leaks.

The project's own server module (bridge/http/server.py) in this process, on a free
loopback port, with short limits; raw sockets, so every byte the client sends is ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI, Request

from bridge.http.body import read_body
from bridge.http.error_boundary import install
from bridge.http.server import ConnectionGate, NodelayStats, make_server
from bridge.service.settings_loader import HttpLimits
from tests.support.waiting import eventually_async

UPGRADE = (b"GET /hook HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
POST = b"POST /hook HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class Seen:
    """What the app got: whole bodies, and requests it gave up on (client gone)."""

    bodies: list[bytes]
    disconnects: int = 0


def make_app(seen: Seen) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/early":  # answered before the body is read (like a 401)
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen.disconnects += 1
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.bodies.append(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


@dataclass
class Listener:
    port: int
    gate: ConnectionGate
    seen: Seen

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def listening(**limits: Any) -> AsyncIterator[Listener]:
    seen = Seen([])
    server = make_server(make_app(seen), "127.0.0.1", 0, NodelayStats(), HttpLimits(**limits))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="listener")
    try:
        yield Listener(sock.getsockname()[1], server.gate, seen)  # type: ignore[attr-defined]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with Content-Length: status, headers (lower-case), body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(lines[0].split()[1]), headers, body


async def closed_after(reader: asyncio.StreamReader, started: float, limit: float) -> float:
    """Seconds from ``started`` until the server closed (EOF); fails past ``limit``."""
    with contextlib.suppress(ConnectionResetError):
        while await asyncio.wait_for(reader.read(4096), limit):
            pass
    return time.monotonic() - started


async def test_websocket_upgrades_are_refused_and_free_their_slot(
        caplog: pytest.LogCaptureFixture) -> None:
    """Each upgrade used to take a slot of the cap for good: past it, every request 503."""
    caplog.set_level(logging.INFO)
    async with listening(max_connections=3) as listener:
        for _ in range(10):
            reader, writer = await listener.connect()
            writer.write(UPGRADE)
            status, headers, body = await response(reader)
            assert status == 400 and headers["connection"] == "close"
            assert json.loads(body)["status"] == "error"
            assert "websocket" in json.loads(body)["message"].lower()
            writer.close()
        await eventually_async(lambda: listener.gate.open == 0, within=5, what="connections closed")
        assert listener.gate.upgrades_refused == 10
        reader, writer = await listener.connect()
        writer.write(POST)
        assert (await response(reader))[0] == 200
        writer.close()
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")
                and r.levelno >= logging.WARNING], "a refused upgrade is logged per request"


async def test_crlf_between_requests_does_not_hold_a_connection() -> None:
    """httptools skips bare CRLFs (no message begins) and any byte cancels uvicorn's
    keep-alive timer: only the header timer, armed on every byte between requests, ends it."""
    async with listening(header_timeout_seconds=0.5, keepalive_timeout_seconds=0.5) as listener:
        reader, writer = await listener.connect()
        writer.write(POST)
        assert (await response(reader))[0] == 200
        started = time.monotonic()

        async def trickle() -> None:
            while not writer.is_closing():
                writer.write(b"\r\n")
                await asyncio.sleep(0.1)  # the client's pace, not a wait for state

        sender = asyncio.create_task(trickle(), name="crlf")
        try:
            held = await closed_after(reader, started, 5)
        finally:
            sender.cancel()
            writer.close()
        assert 0.45 <= held < 2.0, held
        assert listener.gate.header_timeouts == 1
        await eventually_async(lambda: listener.gate.open == 0, within=5, what="connections closed")


async def test_a_body_sent_a_byte_at_a_time_is_answered_408() -> None:
    async with listening(body_timeout_seconds=1.0) as listener:
        reader, writer = await listener.connect()
        writer.write(b"POST /hook HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                while not writer.is_closing():
                    writer.write(b"a")
                    await writer.drain()
                    await asyncio.sleep(0.1)  # the client's pace, not a wait for state

        sender = asyncio.create_task(trickle(), name="body")
        try:
            status, headers, body = await response(reader)
            answered = time.monotonic() - started
            held = await closed_after(reader, started, 10)
        finally:
            sender.cancel()
            writer.close()
        assert status == 408 and headers["connection"] == "close"
        error = json.loads(body)
        assert error["status"] == "error" and "body" in error["message"], error
        assert 0.95 <= answered < 2.0, answered
        assert held < answered + 3.0  # the brief linger that lets the 408 be read
        assert listener.gate.body_timeouts == 1
        await eventually_async(lambda: listener.gate.open == 0 and listener.seen.disconnects == 1,
                               within=5, what="the connection closed, once")
        assert listener.seen.bodies == []


async def test_a_body_in_time_is_answered_and_the_timer_does_not_outlive_it() -> None:
    """Body timer from headers to the body's end only: a kept-alive connection is not
    cut later by it, and the idle limit still applies after the answer."""
    async with listening(body_timeout_seconds=0.3, keepalive_timeout_seconds=1.0) as listener:
        reader, writer = await listener.connect()
        writer.write(b"POST /hook HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\nab")
        await asyncio.sleep(0.1)  # the client's pace: half the body, then the rest
        writer.write(b"cd")
        assert (await response(reader))[0] == 200
        started = time.monotonic()
        held = await closed_after(reader, started, 5)
        writer.close()
        assert listener.seen.bodies == [b"abcd"]
        assert 0.9 <= held < 2.5, held  # the keep-alive timeout, not the body timer
        assert listener.gate.body_timeouts == 0



async def test_answered_before_its_body_then_idle_is_closed() -> None:
    """The body's bytes after an early answer cancel uvicorn's keep-alive timer: the next
    request's headers are timed from the body's end instead."""
    async with listening(header_timeout_seconds=0.5, body_timeout_seconds=30) as listener:
        reader, writer = await listener.connect()
        writer.write(b"POST /early HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\nab")
        assert (await response(reader))[0] == 401
        writer.write(b"cd")  # the rest of the body, then nothing
        started = time.monotonic()
        held = await closed_after(reader, started, 5)
        writer.close()
        assert 0.45 <= held < 2.0, held
        assert listener.gate.header_timeouts == 1
        await eventually_async(lambda: listener.gate.open == 0, within=5, what="connections closed")


async def test_an_app_cut_off_by_the_body_timeout_logs_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """Through the one error boundary: a client left mid-body is not a bug to log."""
    app = FastAPI()
    install(app)

    @app.post("/hook")
    async def hook(request: Request) -> dict[str, str]:
        await read_body(request, 1 << 20)
        return {}

    server = make_server(app, "127.0.0.1", 0, NodelayStats(), HttpLimits(body_timeout_seconds=0.3))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="fastapi-listener")
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        writer.write(b"POST /hook HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\nab")
        assert (await response(reader))[0] == 408
        writer.close()
        gate = server.gate  # type: ignore[attr-defined]
        await eventually_async(lambda: gate.open == 0 and not server.server_state.tasks, within=5,
                               what="connections closed and their tasks done")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
