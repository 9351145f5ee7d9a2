"""The outbox publisher on the in-process broker (no Mosquitto): order, the in-flight
window, the token bucket, refusals set aside, nothing deleted before its PUBACK."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.outbox import Outbox
from bridge.service.taskset import within
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.memory import MemoryBroker, MemoryTransport
from edge_agent.publisher import OutboxPublisher, TokenBucket
from tests.support.waiting import eventually_async


class HeldAcks(MemoryTransport):
    """A broker connection whose PUBACKs wait until the test releases them."""

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(settings)
        self.held: list[asyncio.Future[None]] = []
        self.grew = asyncio.Event()

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> asyncio.Future[None]:
        real = super().publish(topic, payload, qos, retain)
        held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.held.append(held)
        self.grew.set()
        real.add_done_callback(lambda f: None)
        return held

    async def filled(self, n: int) -> None:
        """Until ``n`` publishes wait for their PUBACK."""
        while len(self.held) < n:
            self.grew.clear()
            await self.grew.wait()

    def release(self) -> None:
        for fut in self.held:
            if not fut.done():
                fut.set_result(None)
        self.held.clear()


@dataclass
class Rig:
    broker: MemoryBroker
    outbox: Outbox
    inbox: asyncio.Queue[InboundMessage]
    url: str


@contextlib.asynccontextmanager
async def make_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """Inside the test, not a fixture: the outbox hands commits to the loop it was opened on."""
    name = f"pub-{uuid.uuid4().hex[:8]}"
    broker = MemoryBroker.named(name)
    inbox: asyncio.Queue[InboundMessage] = asyncio.Queue()
    watcher = MemoryTransport(MqttSettings.from_url(f"mqtt://{name}", client_id="watch",
                                                    clean_start=True))
    watcher.message_handler = inbox.put_nowait
    async with Outbox(tmp_path / "outbox.db") as outbox, watcher:
        await watcher.subscribe("org/#", qos=1)
        yield Rig(broker, outbox, inbox, f"mqtt://{name}")


@contextlib.asynccontextmanager
async def running(publisher: OutboxPublisher) -> AsyncIterator[None]:
    task = asyncio.create_task(publisher.run(), name="publisher")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def fill(outbox: Outbox, n: int) -> None:
    for i in range(n):
        await outbox.put(f"org/o/device/R{i % 3}/power", b"%d" % i)


async def drained(outbox: Outbox) -> None:
    await outbox.wait_empty()


async def test_entries_go_out_in_order_and_leave_only_after_their_puback(tmp_path: Path) -> None:
    async with make_rig(tmp_path) as rig:
        await fill(rig.outbox, 300)
        transport = MemoryTransport(MqttSettings.from_url(rig.url, client_id="gw"))
        # Seq order is the rule below the backlog threshold (issue 27: a larger backlog
        # is drained newest state first, tests/test_drain_order.py).
        async with transport, running(OutboxPublisher(rig.outbox, transport, window=20,
                                                      backlog=1000)):
            await asyncio.wait_for(drained(rig.outbox), 10)
        got = [(await asyncio.wait_for(rig.inbox.get(), 5)).payload for _ in range(300)]
        assert got == [b"%d" % i for i in range(300)]


async def test_the_window_bounds_what_is_in_flight(tmp_path: Path) -> None:
    async with make_rig(tmp_path) as rig:
        await fill(rig.outbox, 50)
        transport = HeldAcks(MqttSettings.from_url(rig.url, client_id="gw-held"))
        publisher = OutboxPublisher(rig.outbox, transport, window=8)
        async with transport, running(publisher):
            await asyncio.wait_for(transport.filled(8), 5)
            # The publisher now waits for a slot: it must not send a ninth.
            assert not await within(transport.filled(9), 0.2)
            assert publisher.inflight == 8 and len(transport.held) == 8
            assert rig.outbox.depth == 50  # nothing removed without a PUBACK
            while rig.outbox.depth:
                transport.release()
                await within(rig.outbox.wait_empty(), 0.05)  # acks go via the writer thread
        assert publisher.published == 50


async def test_a_trickle_of_callbacks_costs_one_commit_each_not_two(tmp_path: Path) -> None:
    """One callback at a time, each acknowledged before the next comes: its removal rides
    with the next one's commit instead of a commit (an fsync) of its own, and the last is
    written on its own within the outbox's remove_delay."""
    async with make_rig(tmp_path) as rig:
        transport = MemoryTransport(MqttSettings.from_url(rig.url, client_id="gw-trickle"))
        publisher = OutboxPublisher(rig.outbox, transport)
        async with transport, running(publisher):
            before = rig.outbox.commits
            for i in range(40):
                await rig.outbox.put("org/o/device/R1/power", b"%d" % i)
                await published(publisher, i + 1)
                await asyncio.sleep(0.02)  # the trickle's spacing, not a wait for anything
            assert rig.outbox.commits - before < 50  # 80 when each removal had its own
            await asyncio.wait_for(drained(rig.outbox), 5)


async def published(publisher: OutboxPublisher, n: int) -> None:
    await eventually_async(lambda: publisher.published >= n, what=f"{n} acknowledged")


async def test_refused_entries_are_set_aside_and_the_rest_goes_on(tmp_path: Path) -> None:
    async with make_rig(tmp_path) as rig:
        await fill(rig.outbox, 30)
        rig.broker.refuse = lambda topic, payload: 0x87 if payload in (b"3", b"17") else None
        transport = MemoryTransport(MqttSettings.from_url(rig.url, client_id="gw-refused"))
        publisher = OutboxPublisher(rig.outbox, transport, window=10)
        async with transport, running(publisher):
            await asyncio.wait_for(drained(rig.outbox), 10)
        assert (publisher.rejected, rig.outbox.rejected) == (2, 2)
        got = [(await asyncio.wait_for(rig.inbox.get(), 5)).payload for _ in range(28)]
        assert got == [b"%d" % i for i in range(30) if i not in (3, 17)]


def test_token_bucket_paces_to_its_rate_after_the_burst(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    now = [1000.0]
    monkeypatch.setattr("edge_agent.publisher.time.monotonic", lambda: now[0])
    bucket = TokenBucket(rate=10, burst=5)
    assert [bucket.delay() for _ in range(5)] == [0.0] * 5  # the burst
    assert bucket.delay() == pytest.approx(0.1)  # then one per 1/rate seconds
    assert bucket.delay() == pytest.approx(0.2)
    now[0] += 1.0  # a second later: 10 tokens back, minus the 2 owed
    assert bucket.delay() == 0.0
    assert TokenBucket(rate=0).delay() == 0.0  # 0: unlimited


async def test_resends_back_off_more_each_round_until_a_puback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A broker refusing for now (0x97 quota exceeded: not permanent) three times, then
    # taking it: the rounds' back-off exponents grow 0, 1, 2 and start over after a PUBACK.
    exponents: list[int] = []

    def no_wait(attempt: int, low: float, high: float) -> float:
        exponents.append(attempt)
        return 0.0
    monkeypatch.setattr("edge_agent.publisher.backoff_delay", no_wait)
    async with make_rig(tmp_path) as rig:
        refusals = {b"0": 3, b"1": 1}
        def refuse(topic: str, payload: bytes) -> int | None:
            if refusals.get(payload, 0) > 0:
                refusals[payload] -= 1
                return 0x97
            return None
        rig.broker.refuse = refuse
        transport = MemoryTransport(MqttSettings.from_url(rig.url, client_id="gw-quota"))
        await rig.outbox.put("org/o/device/R0/power", b"0")
        publisher = OutboxPublisher(rig.outbox, transport, window=1)
        async with transport, running(publisher):
            await asyncio.wait_for(drained(rig.outbox), 10)
            assert exponents == [0, 1, 2]
            await rig.outbox.put("org/o/device/R0/power", b"1")
            await asyncio.wait_for(drained(rig.outbox), 10)
        assert exponents == [0, 1, 2, 0] and rig.outbox.rejected == 0
        got = [(await asyncio.wait_for(rig.inbox.get(), 5)).payload for _ in range(2)]
        assert got == [b"0", b"1"]


async def test_a_connected_broker_that_never_acks_stops_the_heartbeat(tmp_path: Path) -> None:
    # The watchdog's view: waiting for PUBACKs a moment, or for a broker that is away, is
    # not wedged; connected with nothing acknowledged for ack_timeout is.
    stamps: list[float] = []
    async with make_rig(tmp_path) as rig:
        await fill(rig.outbox, 5)
        transport = HeldAcks(MqttSettings.from_url(rig.url, client_id="gw-wedged"))
        publisher = OutboxPublisher(rig.outbox, transport, window=8, ack_timeout=0.3,
                                    beat=lambda: stamps.append(time.monotonic()))
        async with transport, running(publisher):
            await asyncio.wait_for(transport.filled(5), 5)
            publisher.beat()
            assert len(stamps) >= 2  # the first PUBACK is not late yet
            await eventually_async(publisher.stalled_for, accept=lambda s: s > 0.3, within=5,
                                   what="the ack limit passed, nothing acked")
            before = len(stamps)
            publisher.beat()
            assert len(stamps) == before  # wedged: the heartbeat goes stale
            rig.broker.stop()
            publisher.beat()
            assert len(stamps) == before + 1  # the broker away: waiting, not wedged
            rig.broker.start()
            publisher.beat()
            assert len(stamps) == before + 2  # a new connection resends: acks start afresh
            transport.release()
            await asyncio.wait_for(drained(rig.outbox), 5)
        assert publisher.stalled_for() == 0.0


FRAME_TOPIC = "org/o/device/gw/batch"


def unpacked(messages: list[InboundMessage]) -> list[tuple[str, int]]:
    """(topic, n) of every message, a batch frame's elements in their place."""
    out: list[tuple[str, int]] = []
    for m in messages:
        doc = json.loads(m.payload)
        if m.topic == FRAME_TOPIC:
            out += [("frame", element["n"]) for element in doc["batch"]]
        else:
            out.append((m.topic, doc["n"]))
    return out


async def take(inbox: asyncio.Queue[InboundMessage], outbox: Outbox) -> list[InboundMessage]:
    """Every message the watcher got by the time the outbox is empty."""
    await asyncio.wait_for(drained(outbox), 10)
    messages = []
    while not inbox.empty():
        messages.append(inbox.get_nowait())
    return messages


async def test_with_frames_always_a_live_burst_goes_out_packed_in_order(tmp_path: Path) -> None:
    async with make_rig(tmp_path) as rig:
        for i in range(150):  # a burst waiting when the publisher comes round
            gateway = i in (40, 41, 99)
            topic = "org/o/device/gw/telemetry" if gateway else f"org/o/device/R{i % 7}/pose"
            await rig.outbox.put(topic, b'{"n": %d}' % i)
        transport = MemoryTransport(MqttSettings.from_url(rig.url, client_id="gw-live"))
        publisher = OutboxPublisher(rig.outbox, transport, window=20, backlog=1000,
                                    frame_topic=FRAME_TOPIC, frame_live=True)
        async with transport, running(publisher):
            burst = await take(rig.inbox, rig.outbox)
            assert not publisher.draining  # live traffic, not a backlog's drain
            # A message waiting alone goes on its own topic, as without frames.
            await rig.outbox.put("org/o/device/R3/pose", b'{"n": 150}')
            lone = await take(rig.inbox, rig.outbox)
        got = unpacked(burst)
        # The gateway's own channel never travels in a frame; the order is the outbox's.
        assert [n for _, n in got] == list(range(150))
        assert [n for topic, n in got if topic != "frame"] == [40, 41, 99]
        assert len(burst) < 10 and publisher.frames == len(burst) - 3
        assert [(m.topic, m.payload) for m in lone] == [("org/o/device/R3/pose", b'{"n": 150}')]
        assert publisher.published == len(burst) + 1


async def test_frames_only_drain_a_backlog_unless_always(tmp_path: Path) -> None:
    async with make_rig(tmp_path) as rig:
        await fill(rig.outbox, 50)
        transport = MemoryTransport(MqttSettings.from_url(rig.url, client_id="gw-on"))
        publisher = OutboxPublisher(rig.outbox, transport, window=20, backlog=1000,
                                    frame_topic=FRAME_TOPIC)  # BATCH_FRAMES=on
        async with transport, running(publisher):
            got = await take(rig.inbox, rig.outbox)
        assert len(got) == 50 and publisher.frames == 0


async def test_a_broker_refusing_live_frames_gets_each_message_on_its_topic(
        tmp_path: Path) -> None:
    async with make_rig(tmp_path) as rig:
        for i in range(60):
            await rig.outbox.put(f"org/o/device/R{i % 3}/pose", b'{"n": %d}' % i)
        rig.broker.refuse = lambda topic, payload: 0x87 if topic == FRAME_TOPIC else None
        transport = MemoryTransport(MqttSettings.from_url(rig.url, client_id="gw-no-frames"))
        publisher = OutboxPublisher(rig.outbox, transport, window=20, backlog=1000,
                                    frame_topic=FRAME_TOPIC, frame_live=True)
        async with transport, running(publisher):
            got = await take(rig.inbox, rig.outbox)
        assert publisher.frame_topic is None  # off for the rest of the run
        assert sorted(json.loads(m.payload)["n"] for m in got) == list(range(60))
        assert {m.topic for m in got} == {f"org/o/device/R{r}/pose" for r in range(3)}
        assert rig.outbox.rejected == 0
