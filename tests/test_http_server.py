"""What one hostile client can hold of a listener: bounded in time, and nothing leaks.

The project's own server module (bridge/http/server.py) in this process, on a free
loopback port, with short limits; raw sockets, so every byte the client sends is ours.
Each limit is tried on an ASGI app and on the same routes answered directly by the
server (``direct_routes``, the edge webhook's way), which must honour it just the same.
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
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from bridge.errors import AuthError, OutboxFullError
from bridge.http.body import read_body
from bridge.http.error_boundary import install
from bridge.http.server import ConnectionGate, NodelayStats, make_server
from bridge.http.shortcut import ShortcutApp
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


def make_app(seen: Seen, direct: bool = False) -> Callable[..., Any]:
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

    if not direct:
        return app

    async def route(scope: Any, receive: Any) -> Response | None:
        """The same answers as ``app``, as a direct route (bridge.http.shortcut)."""
        status: list[int] = []
        body: list[bytes] = []

        async def answered(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            else:
                body.append(message["body"])
        await app(scope, receive, answered)
        return Response(b"".join(body), status[0]) if status else None

    app.direct_routes = {("POST", "/hook"): route, ("POST", "/early"): route}  # type: ignore[attr-defined]
    return app


@pytest.fixture(params=["asgi", "direct"])
def served(request: pytest.FixtureRequest) -> bool:
    """Whether the listener's routes are answered directly (else through ASGI)."""
    return bool(request.param == "direct")


@dataclass
class Listener:
    port: int
    gate: ConnectionGate
    seen: Seen

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def serving(app: Any, limits: HttpLimits | None = None,
                  ) -> AsyncIterator[tuple[int, ConnectionGate]]:
    """``app`` served by make_server on a free loopback port: the port and the gate."""
    server = make_server(app, "127.0.0.1", 0, NodelayStats(), limits or HttpLimits())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="listener")
    try:
        yield sock.getsockname()[1], server.gate  # type: ignore[attr-defined]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@contextlib.asynccontextmanager
async def listening(direct: bool = False, **limits: Any) -> AsyncIterator[Listener]:
    seen = Seen([])
    async with serving(make_app(seen, direct), HttpLimits(**limits)) as (port, gate):
        yield Listener(port, gate, seen)
    # every test sends a request to a route: it went the way asked
    assert (gate.direct > 0) is direct, gate


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
        caplog: pytest.LogCaptureFixture, served: bool) -> None:
    """Each upgrade used to take a slot of the cap for good: past it, every request 503."""
    caplog.set_level(logging.INFO)
    async with listening(served, max_connections=3) as listener:
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


async def test_crlf_between_requests_does_not_hold_a_connection(served: bool) -> None:
    """httptools skips bare CRLFs (no message begins) and any byte cancels uvicorn's
    keep-alive timer: only the header timer, armed on every byte between requests, ends it."""
    async with listening(served, header_timeout_seconds=0.5,
                         keepalive_timeout_seconds=0.5) as listener:
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


async def test_a_body_sent_a_byte_at_a_time_is_answered_408(served: bool) -> None:
    async with listening(served, body_timeout_seconds=1.0) as listener:
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


async def test_a_body_in_time_is_answered_and_the_timer_does_not_outlive_it(served: bool) -> None:
    """Body timer from headers to the body's end only: a kept-alive connection is not
    cut later by it, and the idle limit still applies after the answer."""
    async with listening(served, body_timeout_seconds=0.3,
                         keepalive_timeout_seconds=1.0) as listener:
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



async def test_answered_before_its_body_then_idle_is_closed(served: bool) -> None:
    """The body's bytes after an early answer cancel uvicorn's keep-alive timer: the next
    request's headers are timed from the body's end instead."""
    async with listening(served, header_timeout_seconds=0.5,
                         body_timeout_seconds=30) as listener:
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


def _shortcut_app() -> ShortcutApp:
    """A direct route answering bytes, and a shortcut answering Responses and errors."""
    app = ShortcutApp()
    install(app)

    async def plain(scope: Any, receive: Any) -> bytes | None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if not message.get("more_body"):
                return b'{"got":%d}' % len(body)

    async def shortcut(request: Request) -> Response:
        what = request.headers.get("x-what")
        if what == "auth":
            raise AuthError("missing or invalid key", bearer=True)
        if what == "full":
            raise OutboxFullError(10, 10)
        if what == "bug":
            raise RuntimeError("a bug")
        client = request.client.host if request.client else None
        return JSONResponse({"client": client, "scheme": request.url.scheme,
                             "host": request.headers.get("host")})

    app.direct("POST", "/plain", plain)
    app.shortcut("POST", "/shortcut", shortcut)
    return app


def _post(path: str, body: bytes = b"{}", **headers: str) -> bytes:
    extra = b"".join(b"%s: %s\r\n" % (k.replace("_", "-").encode(), v.encode())
                     for k, v in headers.items())
    return (b"POST %s HTTP/1.1\r\nHost: gw\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), extra, len(body), body))


PIPELINED = [
    _post("/plain", b'{"a": 1}'),
    _post("/shortcut", X_What="auth"),
    _post("/shortcut", X_What="full"),
    _post("/shortcut", X_What="bug"),
    _post("/shortcut", X_Forwarded_For="10.1.2.3", X_Forwarded_Proto="https",
          X_Forwarded_Host="fleet.example.com"),
    b"GET /docs-only HTTP/1.1\r\nHost: gw\r\n\r\n",  # not a shortcut: FastAPI's 404
]


async def _answers(port: int) -> list[tuple[int, dict[str, str], Any]]:
    """The answers to PIPELINED, sent in one write, read in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(PIPELINED))
    answers = []
    for _ in PIPELINED:
        status, headers, body = await response(reader)
        answers.append((status, headers, json.loads(body)))
    writer.close()
    for _, _, body in answers:
        if "timestamp" in body:
            body["timestamp"] = 0
    return answers


async def test_direct_routes_answer_as_the_asgi_app_would(
        caplog: pytest.LogCaptureFixture) -> None:
    """The same app served with its shortcuts answered by the server itself, and through
    ASGI (a wrapper hides ``direct_routes``): the same statuses, headers (framing refused,
    Retry-After, WWW-Authenticate), bodies and X-Forwarded-* handling, in order for
    pipelined requests."""
    app = _shortcut_app()

    async def through_asgi(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send)

    async with serving(app) as (port, gate):
        direct = await _answers(port)
        assert gate.direct == len(PIPELINED) - 1
    async with serving(through_asgi) as (port, gate):
        asgi = await _answers(port)
        assert gate.direct == 0
    assert direct == asgi
    statuses = [status for status, _, _ in direct]
    assert statuses == [200, 401, 503, 500, 200, 404]
    assert direct[0][2] == {"got": 8}
    assert direct[0][1]["content-type"] == "application/json"
    assert all(headers.get("x-frame-options") == "deny" for _, headers, _ in direct)
    assert direct[1][1]["www-authenticate"] == "bearer"  # response() lowers the case
    assert direct[2][1]["retry-after"].isdigit()
    assert direct[3][2]["message"] == "internal error" and "a bug" in caplog.text
    assert direct[4][2] == {"client": "10.1.2.3", "scheme": "https",
                            "host": "fleet.example.com"}


async def test_a_direct_route_honours_http_1_0_and_expect_continue() -> None:
    async with serving(_shortcut_app()) as (port, gate):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /plain HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        status, headers, body = await response(reader)
        assert (status, headers["connection"], body) == (200, "close", b'{"got":2}')
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after it
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /plain HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 3\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"abc")
        status, headers, body = await response(reader)
        assert (status, body) == (200, b'{"got":3}') and "connection" not in headers
        writer.close()
        assert gate.direct == 2
