"""The consumer: every delivery is acked exactly once, after its commit or dead letter,
whatever goes wrong in between; the oldest unacked one is what health watches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from bridge.envelope import Envelope
from bridge.router import MessageRouter
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.memory import MemoryBroker, MemoryTransport
from callback_server.batcher import BatchWriter
from callback_server.consumer import Consumer
from callback_server.store import BatchResult, Item
from tests.support.hostile import valid_envelope
from tests.support.waiting import eventually_async


class Router:
    """Records acks (the part of MessageRouter the consumer uses)."""

    def __init__(self) -> None:
        self.acked: list[InboundMessage] = []
        self.all_acked = asyncio.Event()
        self.expect = 0

    def add(self, *args: Any, **kwargs: Any) -> None:
        pass

    def ack(self, message: InboundMessage) -> None:
        self.acked.append(message)
        if len(self.acked) >= self.expect:
            self.all_acked.set()


class Store:
    """Commits at once, or holds every write while ``hold`` is clear."""

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.dead: list[str] = []
        self.hold = asyncio.Event()
        self.hold.set()

    async def write_batch(self, batch: Sequence[Item]) -> BatchResult:
        items = [i if isinstance(i, tuple) else ('', i) for i in batch]
        await self.hold.wait()
        self.rows += [e.id for _, e in items]
        return BatchResult(len(items), len(items), 0, 0)

    async def dead_letters(self, letters: Sequence[tuple[str, bytes, str]]) -> None:
        self.dead += [reason for _, _, reason in letters]


@pytest.fixture
async def parts() -> AsyncIterator[tuple[Consumer, Router, Store]]:
    router, store = Router(), Store()
    writer = BatchWriter(store)
    consumer = Consumer(router, writer)  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run(), name="writer")
    yield consumer, router, store
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def message(payload: bytes, device: str = "R1", mid: int = 1) -> InboundMessage:
    return InboundMessage(f"org/acme/device/{device}/power", payload, 1, mid=mid)


async def test_a_bug_while_handling_is_dead_lettered_not_left_unacked(
        parts: tuple[Consumer, Router, Store], monkeypatch: pytest.MonkeyPatch) -> None:
    consumer, router, store = parts

    def explode(payload: bytes) -> Envelope:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Envelope, "from_json", staticmethod(explode))
    router.expect = 1
    consumer.on_message(message(json.dumps(valid_envelope("acme", "R1", 1)).encode()))
    await asyncio.wait_for(router.all_acked.wait(), 5)
    assert store.dead == ["could not be handled: RuntimeError: a bug"]
    assert consumer.unacked == 0


async def test_oldest_unacked_age_is_tracked_until_the_commit(
        parts: tuple[Consumer, Router, Store]) -> None:
    consumer, router, store = parts
    store.hold.clear()  # the database hangs: nothing commits
    router.expect = 2
    for i in (1, 2):
        env = json.dumps(valid_envelope("acme", f"R{i}", i)).encode()
        consumer.on_message(message(env, f"R{i}", mid=i))
    assert consumer.unacked == 2
    later = time.monotonic() + 31
    assert consumer.oldest_unacked_seconds(now=later) > 30  # what health compares
    assert consumer.writer.pending == 2 and consumer.writer.stalled_seconds() > 0
    consumer.writer.last_progress -= 31  # as if nothing had committed for 31 s
    assert consumer.writer.stalled_seconds() > 30
    store.hold.set()
    await asyncio.wait_for(router.all_acked.wait(), 5)
    assert consumer.unacked == 0 and consumer.oldest_unacked_seconds() == 0.0
    assert [m.mid for m in router.acked] == [1, 2]


# -- on the in-process broker: what the broker sees ----------------------------------------
@contextlib.asynccontextmanager
async def on_broker(store: Store) -> AsyncIterator[tuple[Consumer, MemoryBroker, str,
                                                          MemoryTransport]]:
    """A consumer on a persistent session of its own in-process broker, and a producer."""
    name = f"cons-{uuid.uuid4().hex[:8]}"
    broker = MemoryBroker.named(name)
    url = f"mqtt://{name}"
    transport = MemoryTransport(MqttSettings.from_url(url, client_id="cloud", manual_ack=True,
                                                      clean_start=False))
    producer = MemoryTransport(MqttSettings.from_url(url, client_id="gw", clean_start=True))
    writer = BatchWriter(store)
    task = asyncio.create_task(writer.run(), name="writer")
    try:
        async with MessageRouter(transport) as router:
            consumer = Consumer(router, writer)
            consumer.route()
            async with transport, producer:
                await router.subscribe(consumer.filter.value, qos=1)
                yield consumer, broker, "cloud", producer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_broker_gets_the_ack_only_after_the_commit() -> None:
    store = Store()
    store.hold.clear()  # the database hangs
    async with on_broker(store) as (consumer, broker, cid, producer):
        for i in range(3):
            await producer.publish(f"org/acme/device/R{i}/power",
                                   json.dumps(valid_envelope("acme", f"R{i}", i)).encode())
        await eventually_async(lambda: consumer.unacked == 3)
        # Delivered, not committed: the broker still holds all three as in flight.
        assert len(broker.sessions[cid].unacked) == 3 and store.rows == []
        store.hold.set()
        await eventually_async(lambda: not broker.sessions[cid].unacked)
        assert sorted(store.rows) == [f"env-R{i}-{i}" for i in range(3)]
        assert consumer.unacked == 0


async def test_faults_are_dead_lettered_and_acked_and_valid_ones_stored() -> None:
    store = Store()
    faults = [  # payloads on org/acme/device/R1/power: not JSON, another org's, a bad field
        b"{not json",
        json.dumps(valid_envelope("beta", "R1", 1)).encode(),
        json.dumps(valid_envelope("acme", "R1", 2, v="x")).encode(),
    ]
    async with on_broker(store) as (consumer, broker, cid, producer):
        for payload in faults:
            await producer.publish("org/acme/device/R1/power", payload)
        await producer.publish("org/acme/device/R9/power",
                               json.dumps(valid_envelope("acme", "R9", 9)).encode())
        await eventually_async(lambda: len(store.dead) == 3 and store.rows == ["env-R9-9"])
        await eventually_async(lambda: not broker.sessions[cid].unacked)  # every one acked, once
    assert consumer.malformed == 3 and consumer.unacked == 0
    reasons = iter(store.dead)
    for expected in ("not JSON", "differ from the topic", "v must be 1"):
        assert expected in next(reasons)
