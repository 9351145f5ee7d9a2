"""A small MQTT shaping proxy: AWS IoT Core's per-connection limits on a local broker.

It terminates the client's mutual TLS (the client certificate checked against the CA,
as AWS IoT does), opens its own mutual-TLS connection to the broker, and reads the
client's MQTT packets: a PUBLISH arriving when the connection already sent ``rate``
publishes or ``byte_rate`` bytes of publishes in the last second is a *violation*
(AWS would throttle it) and is held back until the limits allow it. Counts are per
connection, summed in ``violations``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PUBLISH = 3


@dataclass
class Counts:
    publishes: int = 0
    publish_bytes: int = 0
    violations: int = 0
    connections: int = 0
    times: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    late: list[float] = field(default_factory=list)  # when each violation arrived


def _packet_length(buf: bytearray) -> int | None:
    """The whole packet's length if ``buf`` holds its fixed header, else None."""
    mult, value = 1, 0
    for i in range(1, min(len(buf), 5)):
        byte = buf[i]
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return i + 1 + value
        mult *= 128
    return None


class Shaper:
    """``async with Shaper(...)``: listens on ``port`` until closed."""

    def __init__(self, upstream_port: int, *, ca: Path, server_cert: Path, server_key: Path,
                 client_cert: Path, client_key: Path, rate: float = 100.0,
                 byte_rate: float = 512 * 1024) -> None:
        self.upstream_port = upstream_port
        self.rate, self.byte_rate = rate, byte_rate
        self.counts = Counts()
        self.server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
        self.server_ctx.load_cert_chain(server_cert, server_key)
        self.server_ctx.verify_mode = ssl.CERT_REQUIRED
        self.client_ctx = ssl.create_default_context(cafile=str(ca))
        self.client_ctx.load_cert_chain(client_cert, client_key)
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Shaper:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                  ssl=self.server_ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.counts.connections += 1
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.upstream_port,
                                                   ssl=self.client_ctx,
                                                   server_hostname="127.0.0.1")
        except OSError:
            cw.close()
            return
        down = asyncio.create_task(self._pipe(br, cw))
        try:
            await self._shape(cr, bw)
        finally:
            down.cancel()
            for w in (cw, bw):
                w.close()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()

    async def _shape(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        window: collections.deque[tuple[float, int]] = collections.deque()
        in_window = 0
        buf = bytearray()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await r.read(65536):
                buf += data
                while (size := _packet_length(buf)) is not None and len(buf) >= size:
                    packet, buf = bytes(buf[:size]), buf[size:]
                    if packet[0] >> 4 == PUBLISH:
                        now = time.monotonic()
                        while window and window[0][0] <= now - 1.0:
                            in_window -= window.popleft()[1]
                        if len(window) + 1 > self.rate or in_window + size > self.byte_rate:
                            self.counts.violations += 1
                            self.counts.late.append(now)
                            while window and (len(window) + 1 > self.rate
                                              or in_window + size > self.byte_rate):
                                await asyncio.sleep(max(window[0][0] + 1.0 - now, 0.001))
                                now = time.monotonic()
                                while window and window[0][0] <= now - 1.0:
                                    in_window -= window.popleft()[1]
                        window.append((now, size))
                        in_window += size
                        self.counts.publishes += 1
                        self.counts.publish_bytes += size
                        self.counts.times.append(now)
                        self.counts.sizes.append(size)
                    w.write(packet)
                await w.drain()


async def _serve_until_term(shaper: Shaper, port_file: Path) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with shaper:
        await asyncio.to_thread(port_file.write_text, str(shaper.port))
        await stop.wait()


def main() -> None:
    """``python -m bench.shaper UPSTREAM_PORT CA SERVER_CERT SERVER_KEY CLIENT_CERT
    CLIENT_KEY PORT_FILE COUNTS_FILE``: a process of its own, so the bench's own work
    never delays (and bunches) the publishes it times; counts written on SIGTERM."""
    a = sys.argv[1:]
    shaper = Shaper(int(a[0]), ca=Path(a[1]), server_cert=Path(a[2]), server_key=Path(a[3]),
                    client_cert=Path(a[4]), client_key=Path(a[5]))
    asyncio.run(_serve_until_term(shaper, Path(a[6])))
    c = shaper.counts
    Path(a[7]).write_text(json.dumps({"publishes": c.publishes, "violations": c.violations,
                                      "connections": c.connections, "sizes": c.sizes,
                                      "times": c.times, "late": c.late}))


if __name__ == "__main__":
    main()
