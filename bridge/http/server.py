"""Serving an ASGI app with uvicorn the way both services need it.

Nagle is disabled on every accepted socket, and checked: asyncio's own transport sets
TCP_NODELAY, uvloop's may not on every version, uvicorn does not touch it. Small JSON
answers held back by Nagle + delayed ACK cost ~40 ms each, which would dwarf the
webhook's own latency and the IoT Rule's 3 s budget.

Every listener also bounds what one client can hold (``HttpLimits``), which uvicorn alone
does not: its keep-alive timer starts only after a response, and any byte received
cancels it, so a connection that sends nothing, its headers a byte at a time, bare CRLFs
between requests (httptools skips them without starting a message) or a body a byte at
a time is kept forever; and its ``limit_concurrency`` answers without ``Retry-After``.
Here a header timer runs from accept, and from any byte received while no request is in
progress, until the headers are complete; a body timer then runs until the whole body is
in (past it: 408, or a close if the answer has begun); and past ``max_connections`` a new
connection is answered 503 with ``Retry-After`` and closed, instead of the descriptor
table filling until every accept fails.

WebSocket upgrades are refused (400): no app here speaks WebSocket, and uvicorn hands an
upgraded connection to another protocol object, whose close this one would never see.

``X-Forwarded-*`` is believed only from ``FORWARDED_ALLOW_IPS`` (bridge.http.forwarded), and
every answer refuses to be framed.

An app's direct routes (``ShortcutApp.direct_routes``: the edge webhook, the cloud's
ingest) are answered by the protocol itself: the route gets the scope, with trusted
``X-Forwarded-*`` applied, and uvicorn's ``receive``, and its whole answer goes out in
one write, without ASGI's messages, uvicorn's send or the middleware; everything else
about the request (parsing, limits, keep-alive, pipelining, a graceful stop) is
uvicorn's and this module's as for any route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import uvicorn
from starlette.responses import Response
from starlette.types import Receive, Scope
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from bridge.http.error_boundary import RETRY_AFTER_SECONDS, error_body, internal_error_response
from bridge.http.forwarded import ForwardedHeaders, TrustedProxies, unframeable
from bridge.http.shortcut import Answer, Direct
from bridge.service.settings_loader import HttpLimits

log = logging.getLogger(__name__)


@dataclass(slots=True)
class NodelayStats:
    """What connection_made found and did, for health output and tests."""

    accepted: int = 0
    already_set: int = 0
    set_by_us: int = 0
    failed: int = 0

    @property
    def verified(self) -> bool:
        return self.accepted > 0 and self.failed == 0


#: Seconds a client turned away for too many connections is asked to wait.
BUSY_RETRY_AFTER = RETRY_AFTER_SECONDS
#: How long in-flight requests get to finish once the service stops.
GRACE_SECONDS = 5
#: How long a connection answered by this module (503, 408) is read and discarded after
#: the answer, so that closing with its request unread does not reset the connection
#: before the client has read the answer.
LINGER_SECONDS = 2.0


def error_response(status: int, message: str, *extra: bytes) -> bytes:
    """A whole ``Connection: close`` response in the one error body shape."""
    body = json.dumps(error_body(message)).encode()
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
        *(header + b"\r\n" for header in extra),
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
        b"Connection: close\r\n\r\n", body])


@dataclass(slots=True)
class ConnectionGate:
    """One listener's open connections against its limits, and what the limits did."""

    limits: HttpLimits = field(default_factory=HttpLimits)
    open: int = 0
    refused_busy: int = 0
    header_timeouts: int = 0
    body_timeouts: int = 0
    upgrades_refused: int = 0
    #: requests answered by a direct route without ASGI
    direct: int = 0

    def busy_response(self) -> bytes:
        return error_response(503, "too many open connections; retry later",
                              b"Retry-After: %d" % BUSY_RETRY_AFTER)

    def body_timeout_response(self) -> bytes:
        return error_response(408, "request body not received within "
                              f"{self.limits.body_timeout_seconds:g} s")


#: The answer to ``Upgrade: websocket``; nothing here serves WebSocket.
UPGRADE_REFUSED = error_response(400, "WebSocket is not served here")


def _nodelay_protocol(stats: NodelayStats, gate: ConnectionGate,
                      direct: dict[tuple[str, str], Direct],
                      forwarded: ForwardedHeaders) -> type[asyncio.Protocol]:
    class NodelayHttpProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None  # header, body or linger deadline
        _counted = False  # in gate.open
        _discarding = False  # answered here: what the client still sends is dropped

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._disable_nagle(transport)
            if gate.open >= gate.limits.max_connections:
                self._turn_away(transport)
                return
            gate.open += 1
            self._counted = True
            super().connection_made(transport)
            self._arm(gate.limits.header_timeout_seconds, self._headers_too_slow)

        # -- limits ---------------------------------------------------------------------
        def _turn_away(self, transport: asyncio.Transport) -> None:
            """503 + Retry-After now, then half-close and drain briefly (lingering close)."""
            self.transport = transport
            gate.refused_busy += 1
            self._answer_and_linger(gate.busy_response())

        def _answer_and_linger(self, response: bytes) -> None:
            """Send ``response``, half-close, and drop what the client still sends a while."""
            self._discarding = True
            self._cancel_timer()
            self.transport.write(response)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            # Reading may be paused (flow control): resume it, or the linger is a reset.
            self.transport.resume_reading()
            self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

        def _arm(self, seconds: float, expired: Callable[[], None]) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(seconds, expired)

        def _cancel_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _idle(self) -> bool:
            """No request in progress: a byte now belongs to the next request's headers."""
            return self.cycle is None or self.cycle.response_complete

        def _headers_too_slow(self) -> None:
            self._timer = None
            gate.header_timeouts += 1
            if not self.transport.is_closing():
                self.transport.close()

        def _body_too_slow(self) -> None:
            """408 while the app has not begun its answer; a close once it has."""
            self._timer = None
            gate.body_timeouts += 1
            cycle = self.cycle
            if self.transport.is_closing():
                return
            if cycle is None or cycle.response_started or self.pipeline:  # an answer is on the wire
                self.transport.close()
                return
            # The app sees http.disconnect and anything it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
            self._answer_and_linger(gate.body_timeout_response())

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            if self._idle():
                # uvicorn's keep-alive timer is cancelled by any byte, and httptools
                # starts no message on bare CRLFs: the header timer starts here instead.
                self._arm(gate.limits.header_timeout_seconds, self._headers_too_slow)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._cancel_timer()
            super().on_headers_complete()
            if not self._discarding:
                self._arm(gate.limits.body_timeout_seconds, self._body_too_slow)

        def on_message_complete(self) -> None:
            self._cancel_timer()
            super().on_message_complete()
            if self._idle() and not self._discarding:
                # Answered before its body was in: the body's bytes cancelled uvicorn's
                # keep-alive timer, so the next request's headers are timed from here.
                self._arm(gate.limits.header_timeout_seconds, self._headers_too_slow)

        # -- direct routes ----------------------------------------------------------------
        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            """uvicorn starts each request here (pipelined ones when their turn comes):
            a direct route's runs without the app; ``app`` is another one while uvicorn
            turns a request away (``limit_concurrency``)."""
            scope = cycle.scope
            route = direct.get((scope["method"], scope["path"])) if app is self.app else None
            if route is None:
                super()._start_asgi_task(cycle, app)
                return
            gate.direct += 1
            task = self.loop.create_task(_answer_directly(cycle, route, forwarded))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

        def _should_upgrade_to_ws(self) -> bool:
            """An upgrade is still told apart, to be refused below: the server is given no
            WebSocket protocol (``ws="none"``), which uvicorn would otherwise import, with
            the ``websockets`` library, in every process (~0.3 MiB of an edge's ~59)."""
            return True

        def handle_websocket_upgrade(self) -> None:
            """Refuse instead of switching protocols (the switch would leak our count)."""
            gate.upgrades_refused += 1
            self._answer_and_linger(UPGRADE_REFUSED)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timer()
            if not self._counted:
                return  # turned away: uvicorn never saw this connection
            self._counted = False
            gate.open -= 1
            super().connection_lost(exc)

        # -- Nagle ----------------------------------------------------------------------
        def _disable_nagle(self, transport: asyncio.Transport) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                stats.accepted += 1
                try:
                    if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
                        stats.already_set += 1
                    else:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        if not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
                            raise OSError("TCP_NODELAY did not stick")
                        stats.set_by_us += 1
                except OSError as exc:
                    stats.failed += 1
                    log.warning("could not disable Nagle on %s: %s", sock, exc)

    return NodelayHttpProtocol


_JSON_200 = (STATUS_LINE[200] + b"content-type: application/json\r\n"
             + b"".join(name + b": " + value + b"\r\n" for name, value in unframeable([]))
             + b"content-length: %d\r\n")


def _no_response() -> None:
    """What a finished cycle calls back (uvicorn's run_asgi leaves the same)."""


async def _answer_directly(cycle: RequestResponseCycle, route: Direct,
                           forwarded: ForwardedHeaders) -> None:
    """One request to a direct route, from scope to the last byte of its answer: what
    uvicorn's ``run_asgi`` and ``send`` do for an app, in one write."""
    scope = cast(Scope, cycle.scope)  # uvicorn's TypedDict, Starlette's mapping
    try:
        await forwarded.rewrite(scope)
        answer: Answer = await route(scope, cast(Receive, cycle.receive))
    except Exception:  # a route makes its own error answers: this is a bug
        log.exception("unexpected error in %s %s", scope["method"], scope["path"])
        answer = internal_error_response()
    try:
        if answer is None:
            return  # the client went away (or the body timer answered it)
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        cycle.transport.write(_wire(answer, cycle))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()
        if isinstance(answer, Response) and answer.background is not None:
            await answer.background()
    finally:
        cycle.on_response = _no_response


def _wire(answer: Response | bytes, cycle: RequestResponseCycle) -> bytes:
    """The answer's bytes: status line, headers (framing refused; ``connection: close``
    when the connection ends with it), body."""
    if isinstance(answer, bytes):
        head, body = _JSON_200 % len(answer), answer
    else:
        headers = cycle.default_headers + unframeable(answer.raw_headers)
        for name, value in headers:
            if name.lower() == b"connection" and b"close" in value.lower():
                cycle.keep_alive = False
        head = STATUS_LINE[answer.status_code] + b"".join(
            name + b": " + value + b"\r\n" for name, value in headers)
        body = bytes(answer.body)  # the same object when it is bytes
    if not cycle.keep_alive:
        head += b"connection: close\r\n"
    return b"".join((head, b"\r\n", body))


class _Server(uvicorn.Server):
    """uvicorn.Server whose signals are handled by the shared lifecycle instead.

    uvicorn installs process-wide handlers per server; with two listeners in one
    process (public webhook, admin proxy) only the last would hear SIGTERM. ``gate``
    holds the listener's connection counts.
    """

    def __init__(self, config: uvicorn.Config, gate: ConnectionGate) -> None:
        super().__init__(config)
        self.gate = gate
        #: set once the listener accepts connections (what systemd's READY=1 waits for)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.ready.set()


def make_server(app: Any, host: str, port: int, stats: NodelayStats,
                limits: HttpLimits | None = None,
                trusted: TrustedProxies | None = None) -> uvicorn.Server:
    """A uvicorn server with our protocol and ``limits``; the access log off (it costs ~25%).

    ``trusted``: the peers whose ``X-Forwarded-*`` is believed; by default
    ``FORWARDED_ALLOW_IPS`` as uvicorn reads it (loopback when unset), a bad entry a
    ConfigError instead of uvicorn's silent ignore."""
    gate = ConnectionGate(limits or HttpLimits())
    if trusted is None:
        trusted = TrustedProxies.from_environ(os.environ)
    forwarded = ForwardedHeaders(app, trusted)
    direct = getattr(app, "direct_routes", {})
    config = uvicorn.Config(
        forwarded, host=host, port=port,
        http=_nodelay_protocol(stats, gate, direct, forwarded), ws="none", access_log=False,
        proxy_headers=False,
        log_config=None, lifespan="off", server_header=False, date_header=False,
        # uvicorn hands it straight to call_later: a float is fine despite the int hint.
        timeout_keep_alive=gate.limits.keepalive_timeout_seconds,  # type: ignore[arg-type]
        # Bounds how long a stuck request may hold a stop (systemd's TimeoutStopSec is 20).
        timeout_graceful_shutdown=GRACE_SECONDS,
    )
    return _Server(config, gate)
