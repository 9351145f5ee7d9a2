"""The paho transport alone against a private Mosquitto: CPU per message, each way.

``python -m bench.transport_bare [--messages 30000] [--runs 2]`` (not in ``make bench``:
it measures one module's design, A/B in one run). Each run receives a queued backlog of
QoS 1 envelopes through ``PahoTransport`` (manual acks, as the callback server takes
them) and publishes as many with 100 in flight (as the edge's publisher does), once as
paho reads and writes on its own (a ``recv`` per header byte, a segment per packet) and
once as the transport does (64 KiB reads, corked bursts), alternated. Prints the CPU of
this process and of the broker per message, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import uvloop
from paho.mqtt.enums import CallbackAPIVersion

from bench.procs import Broker, cpu_seconds
from bridge.transport import paho as transport
from bridge.transport.paho import PahoTransport
from bridge.transport.settings import MqttSettings

PAYLOAD = b'{"robot":"' + b"x" * 600 + b'"}'  # about a status envelope's size


class _PlainClient(mqtt.Client):
    """paho as shipped: reads what it asks for."""

    def buffered(self) -> bool:
        return False


@contextlib.contextmanager
def _plain_paho(plain: bool) -> Iterator[None]:
    saved = transport._BufferedClient, transport._corked
    if plain:
        transport._BufferedClient = _PlainClient  # type: ignore[misc,assignment]
        transport._corked = lambda sock: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        yield
    finally:
        transport._BufferedClient, transport._corked = saved  # type: ignore[misc]


def _queue(port: int, n: int) -> None:
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare-pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    infos = [pub.publish(f"org/d/{i % 100}", PAYLOAD, 1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(60)
    pub.disconnect()
    pub.loop_stop()


async def _receive(broker: Broker, n: int) -> tuple[float, float]:
    """(our CPU, the broker's) in µs per message, draining a backlog of ``n``."""
    settings = MqttSettings(host="127.0.0.1", port=broker.port, client_id="bare-sub",
                            clean_start=False, manual_ack=True)
    async with PahoTransport(settings) as t:  # the session, subscribed
        await t.wait_connected()
        await t.subscribe("org/#", 1)
    await asyncio.to_thread(_queue, broker.port, n)
    done, got = asyncio.Event(), 0
    sub = PahoTransport(settings)

    def on_message(message: Any) -> None:
        nonlocal got
        sub.ack(message)
        got += 1
        if got == n:
            done.set()

    sub.message_handler = on_message
    assert broker.proc is not None
    ours, theirs = time.process_time(), cpu_seconds(broker.proc.pid)
    async with sub:
        await asyncio.wait_for(done.wait(), 300)
        ours, theirs = time.process_time() - ours, cpu_seconds(broker.proc.pid) - theirs
    return 1e6 * ours / n, 1e6 * theirs / n


async def _publish(broker: Broker, n: int) -> tuple[float, float]:
    """(our CPU, the broker's) in µs per message, publishing ``n`` with 100 in flight."""
    settings = MqttSettings(host="127.0.0.1", port=broker.port, client_id="bare-pub2")
    window, done, left = asyncio.Semaphore(100), asyncio.Event(), n

    def settled(_: Any) -> None:
        nonlocal left
        window.release()
        left -= 1
        if not left:
            done.set()

    assert broker.proc is not None
    async with PahoTransport(settings) as t:
        await t.wait_connected()
        ours, theirs = time.process_time(), cpu_seconds(broker.proc.pid)
        for i in range(n):
            await window.acquire()
            t.publish(f"org/d/{i % 100}", PAYLOAD, 1).add_done_callback(settled)
        await asyncio.wait_for(done.wait(), 300)
        ours, theirs = time.process_time() - ours, cpu_seconds(broker.proc.pid) - theirs
    return 1e6 * ours / n, 1e6 * theirs / n


async def _one(plain: bool, n: int) -> tuple[tuple[float, float], tuple[float, float]]:
    with tempfile.TemporaryDirectory() as d, Broker(Path(d)) as broker, _plain_paho(plain):
        return await _receive(broker, n), await _publish(broker, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    results: dict[bool, list[Any]] = {True: [], False: []}
    for _ in range(args.runs):
        for plain in (True, False):
            results[plain].append(uvloop.run(_one(plain, args.messages)))
    for plain, label in ((True, "paho as shipped"), (False, "the transport")):
        for received, published in results[plain]:
            print(f"{label:16}  received: {received[0]:5.1f} µs ours, {received[1]:4.1f} "
                  f"broker   published: {published[0]:5.1f} µs ours, {published[1]:4.1f} broker")

    def median(plain: bool, way: int) -> float:
        values = sorted(r[way][0] for r in results[plain])
        return values[len(values) // 2]
    print(f"ours, transport / as shipped: received {median(False, 0) / median(True, 0):.2f}x, "
          f"published {median(False, 1) / median(True, 1):.2f}x")


if __name__ == "__main__":
    main()
