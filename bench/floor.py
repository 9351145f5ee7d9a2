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
import functools
import json
import queue
import signal
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
import orjson
import uvloop

from bench import apps
from bench.procs import (
    Broker,
    Service,
    cpu_seconds,
    free_port,
    http_get,
    python_module,
    thread_cpu_seconds,
)
from bench.profile import record, report
from bench.samples import BodyFactory
from bench.scenarios.common import wait_until
from bench.wrk import run_wrk

_OK_BODY = b'{"status":"success"}'
_OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
       % (len(_OK_BODY), _OK_BODY))
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
_ACKED = object()  # a PUBACK that came before its publish call returned its mid
#: (answer, topic, body): ``answer()`` runs on the loop once the body is committed.
Put = tuple[Callable[[], None], str, bytes]
#: Publishes (seq, topic, body) at QoS 1.
Publish = Callable[[int, str, bytes], None]
#: Connects an MQTT client that calls the given function with each seq on its PUBACK.
Client = Callable[[Callable[[int], None]], Publish]


class Floor:
    """The SQLite outbox's writer thread and the MQTT client, driven from the loop."""

    def __init__(self, path: Path, client: Client,
                 prepare: Callable[[bytes], tuple[str, bytes] | None]) -> None:
        self.path = path
        self.prepare = prepare  # body -> (topic, payload), None if unreadable
        self.publish = client(self.acked_seq)
        self.ops: queue.SimpleQueue[Put | int] = queue.SimpleQueue()
        self.accepted = 0
        self.acked = 0
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._writer, name="floor-writer", daemon=True).start()

    def put(self, answer: Callable[[], None], topic: str, body: bytes) -> None:
        self.ops.put((answer, topic, body))

    def counts(self) -> bytes:
        return orjson.dumps({"accepted": self.accepted, "acked": self.acked})

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
        for seq, (answer, topic, body) in puts:
            answer()
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
            counts = self.floor.counts()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(counts), counts))
            return
        if (message := self.floor.prepare(body)) is None:
            self.transport.write(_BAD)
            return
        transport = self.transport
        self.floor.put(lambda: None if transport.is_closing() else transport.write(_OK),
                       *message)


def asgi(floor: Floor) -> Callable[..., Any]:
    """The same as ``Http``, as a raw ASGI app for uvicorn: what ASGI costs."""
    loop = asyncio.get_running_loop()
    ok = _start(200, _OK_BODY)  # built once: the answer to every accepted body

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["method"] == "GET":
            answer = floor.counts()
            start = _start(200, answer)
        elif (prepared := floor.prepare(body)) is None:
            answer, start = b"", _start(400, b"")
        else:
            committed = loop.create_future()
            floor.put(lambda: committed.set_result(None), *prepared)
            await committed
            answer, start = _OK_BODY, ok
        await send(start)
        await send({"type": "http.response.body", "body": answer})

    return app


def _start(status: int, body: bytes) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": [
        (b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]}


def _bare(body: bytes) -> tuple[str, bytes] | None:
    """A topic by serial number, the body as it came."""
    try:
        doc = orjson.loads(body)
        sn = (doc.get("data") or {}).get("sn") or doc.get("sn") or "unknown"
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return f"floor/{sn}", body


def _edge_work(body: bytes) -> tuple[str, bytes] | None:
    """What the edge's handler does to a body besides HTTP and the outbox: the strict
    bounded parse, normalising, the envelope and its JSON, the body's hash."""
    from bridge import strictjson
    from bridge.envelope import Envelope
    from bridge.errors import PayloadError
    from bridge.outbox import body_key
    from bridge.pudu.normalize import normalize

    try:
        parsed = strictjson.loads(body)
    except PayloadError:
        return None
    now = time.time()
    norm = normalize(parsed.value, received_at=now, max_skew=300.0, clock_offset=0.0)
    device = norm.device_id or "gw-floor"
    envelope = Envelope(id=norm.message_id, type=norm.callback_type, org="floor",
                        device=device, gateway="gw-floor", ts=norm.ts, received_at=now,
                        data=norm.data, raw=norm.raw, channel=norm.channel,
                        notes=(*parsed.notes, *norm.notes))
    body_key(body, norm.robot_ts)  # the retry key the edge computes
    return f"org/floor/device/{device}/{norm.channel}", envelope.to_json()


def _paho(port: int, acked: Callable[[int], None]) -> Publish:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="floor-paho",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    slots: dict[int, Any] = {}  # mid -> seq, or _ACKED when the PUBACK came first

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        seq = slots.setdefault(mid, _ACKED)  # atomic under the GIL: one side finds the other
        if seq is not _ACKED:
            del slots[mid]
            acked(seq)

    def publish(seq: int, topic: str, body: bytes) -> None:
        mid = client.publish(topic, body, qos=1).mid
        if slots.setdefault(mid, seq) is _ACKED:
            del slots[mid]
            acked(seq)

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    return publish


def _crt(port: int, acked: Callable[[int], None]) -> Publish:
    from awscrt import mqtt5

    connected: concurrent.futures.Future[None] = concurrent.futures.Future()
    client = mqtt5.Client(mqtt5.ClientOptions(
        host_name="127.0.0.1", port=port,
        connect_options=mqtt5.ConnectPacket(client_id="floor-crt", keep_alive_interval_sec=60),
        on_lifecycle_event_connection_success_fn=lambda _d: connected.set_result(None),
    ))
    client.start()
    connected.result(10)

    def publish(seq: int, topic: str, body: bytes) -> None:
        future = client.publish(mqtt5.PublishPacket(topic=topic, payload=body,
                                                    qos=mqtt5.QoS.AT_LEAST_ONCE))
        future.add_done_callback(lambda _f: acked(seq))

    return publish


async def serve(port: int, mqtt_port: int, outbox: Path, client: str, *,
                use_asgi: bool, work: bool) -> None:
    connect = _paho if client == "paho" else _crt
    floor = Floor(outbox, functools.partial(connect, mqtt_port),
                  _edge_work if work else _bare)
    if use_asgi:
        import uvicorn

        await uvicorn.Server(uvicorn.Config(
            asgi(floor), host="127.0.0.1", port=port, loop="none", http="httptools",
            lifespan="off", access_log=False, log_level="warning")).serve()
        return
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(floor), "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def _counts(svc: Service) -> dict[str, int]:
    return dict(json.loads(http_get(svc.url + "/")))


def _service(kind: str, base: Path, broker: Broker) -> Service:
    """``fastapi`` (the echo), ``edge`` (the product), or a floor: ``paho`` or ``crt``,
    with ``+asgi`` (served through uvicorn) and ``+work`` (the edge handler's work)."""
    if kind == "fastapi":
        return apps.echo(base, "fastapi")
    if kind in ("edge", "edge+crt", "edge+frames"):  # the product: paho, awscrt, frames
        extra = kind.partition("+")[2]
        return apps.edge_agent(base, "edge", broker.url,
                               base / f"edge-{time.monotonic_ns()}.db",
                               MQTT_BACKEND="crt" if extra == "crt" else "paho",
                               BATCH_FRAMES="always" if extra == "frames" else "off")
    client, *extras = kind.split("+")
    port = free_port()
    argv = python_module("bench.floor", "serve", "--port", str(port), "--mqtt-port",
                         str(broker.port), "--client", client, "--outbox",
                         str(base / f"floor-{time.monotonic_ns()}.db"),
                         *(f"--{extra}" for extra in extras))
    return Service(f"floor-{kind}", argv, base, port=port, env=apps.child_env())


def _measure(kind: str, base: Path, broker: Broker, duration: float,
             profile: Path | None = None) -> tuple[float, float]:
    """(accepts a second, CPU µs an accept) of one server under wrk for ``duration``;
    sampled by py-spy into ``profile/profile-floor-<kind>-top.txt`` when given."""
    with _service(kind, base, broker) as svc:
        spy = None if profile is None else record(svc.pid, base / "spy.txt",
                                                  duration=duration)
        cpu0, threads0 = cpu_seconds(svc.pid), thread_cpu_seconds(svc.pid)
        result = run_wrk(svc.port, BodyFactory(robots=1000), base, duration=duration)
        cpu, threads = cpu_seconds(svc.pid) - cpu0, thread_cpu_seconds(svc.pid)
        by_thread = {name: (used - threads0.get(name, 0.0)) / result.ok * 1e6
                     for name, used in threads.items()}
        print(f"  {kind} by thread (µs an accept): " + ", ".join(
            f"{name} {us:.1f}" for name, us in sorted(by_thread.items(), key=lambda t: -t[1])
            if us >= 0.5), flush=True)
        if spy is not None and profile is not None:
            spy.wait(120)
            name = kind.replace("+", "-")
            (profile / f"profile-floor-{name}-top.txt").write_text(
                report(base / "spy.txt", top=40).replace("spy.txt", f"floor {kind}") + "\n")
        if not kind.startswith(("fastapi", "edge")):  # each accepted body reached the broker
            wait_until(lambda: (c := _counts(svc))["acked"] >= c["accepted"], timeout=60,
                       interval=0.1, what=f"{kind}: every accepted body acknowledged")
            if (counts := _counts(svc))["accepted"] < result.ok:
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
    run.add_argument("--asgi", action="store_true", help="served through uvicorn")
    run.add_argument("--work", action="store_true", help="the edge handler's work too")
    parser.add_argument("--kinds", default="fastapi,paho,crt,paho+asgi,paho+asgi+work,edge",
                        help="servers alternated in each run (fastapi first: the ratios')")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="then one pass of each under py-spy, summaries written here")
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    if args.command == "serve":
        uvloop.run(serve(args.port, args.mqtt_port, args.outbox, args.client,
                         use_asgi=args.asgi, work=args.work))
        return
    kinds = args.kinds.split(",")
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
            if args.profile is not None:  # a pass of its own: sampling slows the target
                args.profile.mkdir(parents=True, exist_ok=True)
                for kind in kinds[1:]:
                    _measure(kind, base, broker, args.duration, args.profile)
    for kind in kinds if args.runs else ():
        ratios = [r / e for r, e in zip(rates[kind], rates["fastapi"], strict=True)]
        print(f"{kind}: {statistics.median(rates[kind]):,.0f}/s "
              f"({min(rates[kind]):,.0f}-{max(rates[kind]):,.0f}), "
              f"CPU {statistics.median(cpus[kind]):.1f} µs "
              f"({min(cpus[kind]):.1f}-{max(cpus[kind]):.1f}), against the FastAPI echo "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
