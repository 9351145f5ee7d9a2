"""A small asyncio HTTP/1.1 load generator: keep-alive connections, raw streams.

httpx costs more CPU per request than the servers under test, and on a two-core machine
every microsecond the generator burns is taken from them. This client writes
pre-formatted requests and parses only the status line, Content-Length and
``Connection: close``.

Two modes:

* ``closed_loop``: ``connections`` workers send back to back for ``duration`` seconds
  (maximum throughput; the fallback when ``wrk`` is not installed).
* ``open_loop``: requests are *scheduled* at a fixed ``rate``; latency runs from the
  scheduled time to the end of the response, so a stalled server is charged for the
  requests it delayed (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from bench.samples import CALLBACK_CODE, WEBHOOK_PATH


class Bodies(Protocol):
    """What the generator sends: ``BodyFactory`` (webhooks) or envelope bodies."""

    def body(self, n: int) -> bytes: ...

    def trace_id(self, n: int) -> str: ...


#: Called for every 2xx answer: request number, wall-clock send time, response body.
OnResponse = Callable[[int, float, bytes], None]


class HttpError(Exception):
    """The server answered something this client cannot read."""


@dataclass(slots=True)
class LoadResult:
    """What one load run saw."""

    sent: int = 0
    ok: int = 0
    failed: int = 0  # non-2xx answers
    errors: int = 0  # connection errors, timeouts
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx answers only
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def ok_per_second(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile in seconds (nearest rank); NaN without samples."""
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        rank = min(len(data) - 1, max(0, round(q / 100 * len(data) + 0.5) - 1))
        return data[rank]


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._reader, self._writer = reader, writer
        return reader, writer

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self._reader is None or self._writer is None:
            reader, writer = await self._open()
        else:
            reader, writer = self._reader, self._writer
        writer.write(data)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            raise HttpError(f"no Content-Length in {head[:200]!r}")
        end = lower.index(b"\r\n", at + 2)
        body = await reader.readexactly(int(lower[at + 17:end]))
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def request_bytes(factory: Bodies, n: int, *, path: str = WEBHOOK_PATH,
                  code: str = CALLBACK_CODE, headers: str = "") -> bytes:
    """``headers``: extra header lines, each ending in CRLF (the cloud's ingest token)."""
    body = factory.body(n)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"CallbackCode: {code}\r\nTraceId: {factory.trace_id(n)}\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _record(result: LoadResult, status: int, latency: float) -> None:
    result.statuses[status] = result.statuses.get(status, 0) + 1
    if 200 <= status < 300:
        result.ok += 1
        result.latencies.append(latency)
    else:
        result.failed += 1


async def closed_loop(host: str, port: int, factory: Bodies, *, duration: float,
                      connections: int = 64, path: str = WEBHOOK_PATH,
                      requests: int | None = None, headers: str = "") -> LoadResult:
    """Back-to-back requests on ``connections`` connections for ``duration`` seconds
    (or until ``requests`` were sent, the first to come)."""
    result = LoadResult()
    counter = iter(range(1 << 62 if requests is None else requests))
    start = time.perf_counter()
    deadline = start + duration

    async def worker() -> None:
        conn = Connection(host, port)
        try:
            while time.perf_counter() < deadline:
                n = next(counter, None)
                if n is None:
                    return
                data = request_bytes(factory, n, path=path, headers=headers)
                result.sent += 1
                sent = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(conn.request(data), 10.0)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, HttpError):
                    result.errors += 1
                    conn.close()
                    continue
                _record(result, status, time.perf_counter() - sent)
        finally:
            conn.close()

    async with asyncio.TaskGroup() as tg:
        for i in range(connections):
            tg.create_task(worker(), name=f"load-{i}")
    result.elapsed = time.perf_counter() - start
    return result


async def open_loop(host: str, port: int, factory: Bodies, *, rate: float,
                    duration: float, connections: int = 64, path: str = WEBHOOK_PATH,
                    on_response: OnResponse | None = None, headers: str = "") -> LoadResult:
    """``rate`` requests per second for ``duration`` seconds on up to ``connections``."""
    result = LoadResult()
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Connection(host, port))
    total = int(rate * duration)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.05
    wall_start = time.time() + 0.05

    async def fire(n: int, due: float) -> None:
        data = request_bytes(factory, n, path=path, headers=headers)
        conn = await idle.get()
        try:
            status, body = await asyncio.wait_for(conn.request(data), 10.0)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, HttpError):
            result.errors += 1
            conn.close()
            return
        finally:
            idle.put_nowait(conn)
        _record(result, status, time.perf_counter() - due)
        if on_response is not None and 200 <= status < 300:
            on_response(n, wall_start + (due - start), body)

    for n in range(total):
        due = start + n / rate
        ahead = due - time.perf_counter()
        if ahead > 0.0005:
            await asyncio.sleep(ahead)
        task = asyncio.create_task(fire(n, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        result.sent += 1
    if tasks:
        await asyncio.wait(tasks)
    result.elapsed = time.perf_counter() - start
    while not idle.empty():
        idle.get_nowait().close()
    return result
