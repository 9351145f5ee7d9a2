"""The floor of a durable, published accept built from this stack's parts.

``python -m bench.floor [--runs 3] [--duration 10]`` (not in ``make bench``: it measures
what bounds target 1a, not the product). A webhook that does only what the edge must,
and none of what else the edge does (validating and normalising the callback, dedup,
clocks, the envelope, HTTP limits, metrics): a bare ``httptools`` parser in a uvloop
protocol, no ASGI; each body committed to SQLite (WAL, ``synchronous=FULL``) by one
writer thread's group commits before its 200; then published at QoS 1 and deleted on
its PUBACK, by paho (its network thread, MQTT 5, 100 in flight) or by awscrt's native
MQTT 5 client. Alternated in each run with the FastAPI echo 1a is judged against, wrk
loading each with the sample mix as ``ingest`` does, a private Mosquitto. Prints
accepts/s, CPU µs an accept and the ratio to the echo of the same run: the most an edge
made of these parts can reach, before any of its own work.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import queue
import signal
import sqlite3
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
import orjson
import uvloop

from bench import apps
from bench.procs import Broker, Service, cpu_seconds, free_port, python_module
from bench.samples import BodyFactory
from bench.wrk import run_wrk

_OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
       b'{"status":"success"}')
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
_ACKED = object()  # a PUBACK that came before its publish call returned its mid
Put = tuple[asyncio.Transport, str, bytes]


class Floor:
    """The SQLite outbox's writer thread and the MQTT client, driven from the loop."""

    def __init__(self, path: Path, publish: Callable[[int, str, bytes], None]) -> None:
        self.path = path
        self.publish = publish  # (seq, topic, body): must call ``acked(seq)`` on its PUBACK
        self.ops: queue.SimpleQueue[Put | int] = queue.SimpleQueue()
        self.accepted = 0
        self.acked = 0
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._writer, name="floor-writer", daemon=True).start()

    def put(self, transport: asyncio.Transport, topic: str, body: bytes) -> None:
        self.ops.put((transport, topic, body))

    def acked_seq(self, seq: int) -> None:
        """Any thread: the broker has it; the next commit deletes it."""
        self.ops.put(seq)

    def _writer(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS outbox "
                     "(seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, body BLOB NOT NULL)")
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0]
        while True:
            ops = [self.ops.get()]
            while True:
                try:
                    ops.append(self.ops.get_nowait())
                except queue.Empty:
                    break
            puts: list[tuple[int, Put]] = []
            done: list[tuple[int]] = []
            for op in ops:
                if isinstance(op, int):
                    done.append((op,))
                else:
                    seq += 1
                    puts.append((seq, op))
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO outbox VALUES (?, ?, ?)",
                             [(s, topic, body) for s, (_, topic, body) in puts])
            conn.executemany("DELETE FROM outbox WHERE seq = ?", done)
            conn.execute("COMMIT")
            self.loop.call_soon_threadsafe(self._committed, puts, len(done))

    def _committed(self, puts: list[tuple[int, Put]], acked: int) -> None:
        self.acked += acked
        self.accepted += len(puts)
        for seq, (transport, topic, body) in puts:
            if not transport.is_closing():
                transport.write(_OK)
            self.publish(seq, topic, body)


class Http(asyncio.Protocol):
    """HTTP/1.1 keep-alive on httptools: POST a callback, or GET the counts."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.parser = httptools.HttpRequestParser(self)
        self.chunks: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        body, self.chunks = b"".join(self.chunks), []
        if self.parser.get_method() == b"GET":
            counts = orjson.dumps({"accepted": self.floor.accepted, "acked": self.floor.acked})
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(counts), counts))
            return
        try:
            doc = orjson.loads(body)
            sn = (doc.get("data") or {}).get("sn") or doc.get("sn") or "unknown"
        except (orjson.JSONDecodeError, AttributeError):
            self.transport.write(_BAD)
            return
        self.floor.put(self.transport, f"floor/{sn}", body)


def _paho(port: int) -> tuple[Callable[[int, str, bytes], None], Callable[[Floor], None]]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="floor-paho",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    slots: dict[int, Any] = {}  # mid -> seq, or _ACKED when the PUBACK came first
    floor: Floor | None = None

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        seq = slots.setdefault(mid, _ACKED)  # atomic under the GIL: one side finds the other
        if seq is not _ACKED:
            del slots[mid]
            assert floor is not None
            floor.acked_seq(seq)

    def publish(seq: int, topic: str, body: bytes) -> None:
        mid = client.publish(topic, body, qos=1).mid
        if slots.setdefault(mid, seq) is _ACKED:
            del slots[mid]
            assert floor is not None
            floor.acked_seq(seq)

    def bind(f: Floor) -> None:
        nonlocal floor
        floor = f

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    return publish, bind


def _crt(port: int) -> tuple[Callable[[int, str, bytes], None], Callable[[Floor], None]]:
    from awscrt import mqtt5

    connected: concurrent.futures.Future[None] = concurrent.futures.Future()
    client = mqtt5.Client(mqtt5.ClientOptions(
        host_name="127.0.0.1", port=port,
        connect_options=mqtt5.ConnectPacket(client_id="floor-crt", keep_alive_interval_sec=60),
        on_lifecycle_event_connection_success_fn=lambda _d: connected.set_result(None),
    ))
    client.start()
    connected.result(10)
    floor: Floor | None = None

    def publish(seq: int, topic: str, body: bytes) -> None:
        future = client.publish(mqtt5.PublishPacket(topic=topic, payload=body,
                                                    qos=mqtt5.QoS.AT_LEAST_ONCE))
        assert floor is not None
        future.add_done_callback(lambda _f, f=floor: f.acked_seq(seq))

    def bind(f: Floor) -> None:
        nonlocal floor
        floor = f

    return publish, bind


async def serve(port: int, mqtt_port: int, outbox: Path, client: str) -> None:
    publish, bind = (_paho if client == "paho" else _crt)(mqtt_port)
    floor = Floor(outbox, publish)
    bind(floor)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(floor), "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def _counts(svc: Service) -> dict[str, int]:
    with urllib.request.urlopen(svc.url + "/", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def _measure(kind: str, base: Path, broker: Broker, duration: float) -> tuple[float, float]:
    """(accepts a second, CPU µs an accept) of one server under wrk for ``duration``."""
    if kind == "fastapi":
        svc = apps.echo(base, "fastapi")
    else:
        port = free_port()
        svc = Service(f"floor-{kind}", python_module(
            "bench.floor", "serve", "--port", str(port), "--mqtt-port", str(broker.port),
            "--outbox", str(base / f"floor-{kind}-{time.monotonic_ns()}.db"),
            "--client", kind), base, port=port, env=apps.child_env())
    with svc:
        cpu0 = cpu_seconds(svc.pid)
        result = run_wrk(svc.port, BodyFactory(robots=1000), base, duration=duration)
        cpu = cpu_seconds(svc.pid) - cpu0
        if kind != "fastapi":  # every accepted body reached the broker, or the floor is off
            deadline = time.monotonic() + 60
            while (counts := _counts(svc))["acked"] < counts["accepted"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind}: {counts} after 60 s")
                time.sleep(0.1)  # polling the counts is the drain's only signal
            if counts["accepted"] < result.ok:
                raise RuntimeError(f"{kind}: wrk saw {result.ok} answers, {counts} accepted")
    return result.ok_per_second, cpu / result.ok * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("serve", help="one floor server (the runner starts them)")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--mqtt-port", type=int, required=True)
    run.add_argument("--outbox", type=Path, required=True)
    run.add_argument("--client", choices=["paho", "crt"], default="paho")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    if args.command == "serve":
        uvloop.run(serve(args.port, args.mqtt_port, args.outbox, args.client))
        return
    kinds = ("fastapi", "paho", "crt")
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        base = Path(tmp)
        with Broker(base / "broker") as broker:
            for i in range(args.runs):
                for kind in kinds:
                    rate, cpu = _measure(kind, base, broker, args.duration)
                    rates[kind].append(rate)
                    cpus[kind].append(cpu)
                    print(f"run {i + 1} {kind}: {rate:,.0f}/s, {cpu:.1f} µs CPU each",
                          flush=True)
    for kind in kinds:
        ratios = [r / e for r, e in zip(rates[kind], rates["fastapi"], strict=True)]
        print(f"{kind}: {statistics.median(rates[kind]):,.0f}/s "
              f"({min(rates[kind]):,.0f}-{max(rates[kind]):,.0f}), "
              f"CPU {statistics.median(cpus[kind]):.1f} µs "
              f"({min(cpus[kind]):.1f}-{max(cpus[kind]):.1f}), against the FastAPI echo "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
