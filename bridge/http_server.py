"""Serving an ASGI app with uvicorn the way both services need it.

Nagle is disabled on every accepted socket, and checked: asyncio's own transport sets
TCP_NODELAY, uvloop's may not on every version, uvicorn does not touch it. Small JSON
answers held back by Nagle + delayed ACK cost ~40 ms each, which would dwarf the
webhook's own latency and the IoT Rule's 3 s budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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


def _nodelay_protocol(stats: NodelayStats) -> type[asyncio.Protocol]:
    class NodelayHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
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
            super().connection_made(transport)

    return NodelayHttpProtocol


class _Server(uvicorn.Server):
    """uvicorn.Server whose signals are handled by ``serve_until_signal`` instead.

    uvicorn installs process-wide handlers per server; with two listeners in one
    process (public webhook, admin proxy) only the last would hear SIGTERM.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(app: Any, host: str, port: int, stats: NodelayStats) -> uvicorn.Server:
    """A uvicorn server with our protocol; the access log off (it costs ~25%)."""
    config = uvicorn.Config(
        app, host=host, port=port, http=_nodelay_protocol(stats), access_log=False,
        log_config=None, lifespan="off", server_header=False, date_header=False,
    )
    return _Server(config)


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
