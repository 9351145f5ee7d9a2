"""Serving an ASGI app with uvicorn the way both services need it.

Nagle is disabled on every accepted socket, and checked: asyncio's own transport sets
TCP_NODELAY, uvloop's may not on every version, uvicorn does not touch it. Small JSON
answers held back by Nagle + delayed ACK cost ~40 ms each, which would dwarf the
webhook's own latency and the IoT Rule's 3 s budget.

Every listener also bounds what one client can hold (``HttpLimits``), which uvicorn alone
does not: its keep-alive timer starts only after a response, so a connection that sends
nothing, or its headers a byte at a time, is kept forever, and its ``limit_concurrency``
answers without ``Retry-After``. Here a header timer runs from accept (and from the first
byte of each next request) until the headers are complete, and past ``max_connections``
a new connection is answered 503 with ``Retry-After`` and closed, instead of the
descriptor table filling until every accept fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bridge.config import HttpLimits
from bridge.http_errors import RETRY_AFTER_SECONDS, error_body

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
#: How long a turned-away connection is read (and discarded) after its 503, so that
#: closing with its request unread does not reset the connection before the 503 is read.
BUSY_LINGER_SECONDS = 2.0


@dataclass(slots=True)
class ConnectionGate:
    """One listener's open connections against its limits, and what the limits did."""

    limits: HttpLimits = field(default_factory=HttpLimits)
    open: int = 0
    refused_busy: int = 0
    header_timeouts: int = 0

    def busy_response(self) -> bytes:
        body = json.dumps(error_body("too many open connections; retry later")).encode()
        return (b"HTTP/1.1 503 Service Unavailable\r\n"
                b"Retry-After: %d\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (BUSY_RETRY_AFTER, len(body), body))


def _nodelay_protocol(stats: NodelayStats, gate: ConnectionGate) -> type[asyncio.Protocol]:
    class NodelayHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _turned_away = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._disable_nagle(transport)
            if gate.open >= gate.limits.max_connections:
                self._turn_away(transport)
                return
            gate.open += 1
            super().connection_made(transport)
            self._arm_header_timer()

        # -- limits ---------------------------------------------------------------------
        def _turn_away(self, transport: asyncio.Transport) -> None:
            """503 + Retry-After now, then half-close and drain briefly (lingering close)."""
            self._turned_away = True
            self.transport = transport
            gate.refused_busy += 1
            transport.write(gate.busy_response())
            if transport.can_write_eof():
                transport.write_eof()
            self._header_timer = self.loop.call_later(BUSY_LINGER_SECONDS, transport.close)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(
                    gate.limits.header_timeout_seconds, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            gate.header_timeouts += 1
            if not self.transport.is_closing():
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()  # a next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if not self._turned_away:  # a turned-away client's request is discarded
                super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            if self._turned_away:
                return
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


class _Server(uvicorn.Server):
    """uvicorn.Server whose signals are handled by ``serve_until_signal`` instead.

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
                limits: HttpLimits | None = None) -> uvicorn.Server:
    """A uvicorn server with our protocol and ``limits``; the access log off (it costs ~25%)."""
    gate = ConnectionGate(limits or HttpLimits())
    config = uvicorn.Config(
        app, host=host, port=port, http=_nodelay_protocol(stats, gate), access_log=False,
        log_config=None, lifespan="off", server_header=False, date_header=False,
        # uvicorn hands it straight to call_later: a float is fine despite the int hint.
        timeout_keep_alive=gate.limits.keepalive_timeout_seconds,  # type: ignore[arg-type]
        # Bounds how long a stuck request may hold a stop (systemd's TimeoutStopSec is 20).
        timeout_graceful_shutdown=GRACE_SECONDS,
    )
    return _Server(config, gate)


async def serve_until_signal(*servers: uvicorn.Server) -> None:
    """Serve until SIGTERM/SIGINT (or one server stops), then stop all gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(s.serve(), name=f"http-{i}") for i, s in enumerate(servers)]
    waiter = asyncio.create_task(stop.wait(), name="signal-wait")
    try:
        await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        waiter.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]
