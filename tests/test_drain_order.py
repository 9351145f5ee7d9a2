"""Draining a backlog after an outage (issue 27), on the in-process broker with a rate
limit: newest state and events first, superseded positions after as ``replay`` history,
pacing under the limits, batch frames, fresh callbacks within 2 s."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bridge import frames
from bridge.envelope import Envelope
from bridge.outbox import Outbox
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.memory import MemoryBroker, MemoryTransport
from edge_agent.publisher import OutboxPublisher

FRAME_TOPIC = "org/o/device/gw/batch"


class Metered(MemoryTransport):
    """A broker connection that records when each publish went out and its size, so a
    test can count publishes and bytes in any one-second window (AWS's limits)."""

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(settings)
        self.sent: list[tuple[float, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> asyncio.Future[None]:
        self.sent.append((time.monotonic(), len(payload)))
        return super().publish(topic, payload, qos, retain)

    def worst_second(self) -> tuple[int, int]:
        """The most publishes, and the most bytes, in any one-second window."""
        most_n = most_b = 0
        for i, (start, _) in enumerate(self.sent):
            inside = [size for at, size in self.sent[i:] if at < start + 1.0]
            most_n, most_b = max(most_n, len(inside)), max(most_b, sum(inside))
        return most_n, most_b


def env(i: int, device: str, channel: str, ts: float) -> bytes:
    types = {"pose": "notifyRobotPose", "status": "notifyRobotStatus",
             "event": "notifyRobotErrorWarning"}
    return Envelope(id=f"m{i}", type=types[channel], org="o", device=device, gateway="gw",
                    ts=ts, received_at=ts, data={"n": i}, channel=channel).to_json()


async def backlog(outbox: Outbox, robots: int = 3, poses: int = 100) -> list[str]:
    """An outage's worth: per robot ``poses`` poses (compactable), a status change every
    20 and an event every 25, interleaved; returns the ids in the order put."""
    ids, n, t0 = [], 0, 1_700_000_000.0
    for k in range(poses):
        for r in range(robots):
            dev = f"R{r}"
            kinds = ["pose"] + (["status"] if k % 20 == 0 else []) + \
                (["event"] if k % 25 == 7 else [])
            for kind in kinds:
                n += 1
                key = f"pose:{dev}" if kind == "pose" else None
                await outbox.put(f"org/o/device/{dev}/{kind}", env(n, dev, kind, t0 + k),
                                 compact_key=key, order=t0 + k)
                ids.append(f"m{n}")
    return ids


@contextlib.asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[tuple[Outbox, asyncio.Queue[InboundMessage],
                                                     str]]:
    name = f"drain-{uuid.uuid4().hex[:8]}"
    MemoryBroker.named(name)
    inbox: asyncio.Queue[InboundMessage] = asyncio.Queue()
    watcher = MemoryTransport(MqttSettings.from_url(f"mqtt://{name}", client_id="cloud",
                                                    clean_start=True))
    watcher.message_handler = inbox.put_nowait
    async with Outbox(tmp_path / "outbox.db") as outbox, watcher:
        await watcher.subscribe("org/#", qos=1)
        yield outbox, inbox, f"mqtt://{name}"


@contextlib.asynccontextmanager
async def running(publisher: OutboxPublisher) -> AsyncIterator[None]:
    task = asyncio.create_task(publisher.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def envelopes(messages: list[InboundMessage]) -> list[dict[str, Any]]:
    """What the cloud received, frames unpacked, in arrival order."""
    out: list[dict[str, Any]] = []
    for m in messages:
        body = json.loads(m.payload)
        out.extend(frames.elements(body) if m.topic.endswith("/batch") else [body])
    return out


async def collect(inbox: asyncio.Queue[InboundMessage], outbox: Outbox) -> list[InboundMessage]:
    await asyncio.wait_for(outbox.wait_empty(), 30)
    got = []
    while not inbox.empty():
        got.append(inbox.get_nowait())
    return got


STATE = ("status", "pose", "power", "move")


def check_drain_order(got: list[dict[str, Any]], ids: list[str]) -> None:
    """The cloud's view: every message once; each robot's newest state first, then the
    events in the order put, then history (marked); what merges into state does so in
    robot-time order per robot and channel."""
    assert sorted(e["id"] for e in got) == sorted(ids)  # nothing lost, nothing twice
    flags = [bool(e.get("replay")) for e in got]
    first_history = flags.index(True)
    late = [(i, e["id"], e["channel"]) for i, e in enumerate(got)
            if i > first_history and not e.get("replay")]
    assert not late, f"history is sent after everything current: {first_history} {late}"
    current = got[:first_history]
    newest: dict[tuple[str, str], float] = {}
    for e in got:
        if e["channel"] in STATE:
            key = (e["device"], e["channel"])
            newest[key] = max(e["ts"], newest.get(key, e["ts"]))
    states = [(e["device"], e["channel"], e["ts"]) for e in current if e["channel"] in STATE]
    assert sorted(states) == sorted((d, c, ts) for (d, c), ts in newest.items()), \
        "each robot's newest state goes out first, once"
    assert all(e["channel"] in STATE for e in current[:len(states)]), "state before events"
    for e in got[first_history:]:
        assert e["channel"] in STATE and e["ts"] < newest[(e["device"], e["channel"])]
    events = [e["id"] for e in got if e["channel"] not in STATE]
    assert events == [i for i in ids if i in set(events)], "events in the order put"


async def test_a_backlog_goes_newest_state_first_and_history_after(tmp_path: Path) -> None:
    async with rig(tmp_path) as (outbox, inbox, url):
        ids = await backlog(outbox)
        assert len(ids) == 327  # 300 poses, 15 status, 12 events
        transport = Metered(MqttSettings.from_url(url, client_id="gw"))
        publisher = OutboxPublisher(outbox, transport, window=50, rate_limit=200)
        async with transport, running(publisher):
            got = envelopes(await collect(inbox, outbox))
        check_drain_order(got, ids)
        assert publisher.replayed == 297 + 12 and publisher.published == 327
        most, _ = transport.worst_second()
        assert most <= 200, most  # never over the limit in any second
        assert publisher.throttled_s > 0.3


async def test_batch_frames_carry_the_same_drain_in_few_billed_units(tmp_path: Path) -> None:
    async with rig(tmp_path) as (outbox, inbox, url):
        ids = await backlog(outbox, robots=4, poses=150)
        transport = Metered(MqttSettings.from_url(url, client_id="gw"))
        publisher = OutboxPublisher(outbox, transport, window=20, rate_limit=100,
                                    byte_limit=512 * 1024, frame_topic=FRAME_TOPIC)
        async with transport, running(publisher):
            messages = await collect(inbox, outbox)
        got = envelopes(messages)
        check_drain_order(got, ids)
        assert publisher.frames > 0
        assert all(len(m.payload) <= frames.FRAME_BYTES for m in messages)
        units = sum(frames.billed_units(len(m.payload)) for m in messages)
        assert len(messages) * 5 < len(ids) and units * 2 < len(ids), (len(messages), units)


async def test_fresh_callbacks_during_a_drain_go_out_within_two_seconds(tmp_path: Path) -> None:
    async with rig(tmp_path) as (outbox, inbox, url):
        await backlog(outbox, robots=3, poses=200)  # ~660 entries: ~7 s at 100/s
        transport = Metered(MqttSettings.from_url(url, client_id="gw"))
        publisher = OutboxPublisher(outbox, transport, window=100, rate_limit=100)
        async with transport, running(publisher):
            for _ in range(150):  # well into the drain
                await asyncio.wait_for(inbox.get(), 5)
            assert publisher.draining
            put_at = time.monotonic()
            await outbox.put("org/o/device/R1/status", env(10_000, "R1", "status", 2e9),
                             order=2e9)
            while True:
                m = await asyncio.wait_for(inbox.get(), 5)
                if json.loads(m.payload)["id"] == "m10000":
                    break
            assert time.monotonic() - put_at < 2.0
            assert outbox.depth > 100  # the drain was still going


async def feed(outbox: Outbox, per_second: int, seconds: float) -> list[str]:
    """Callbacks at ``per_second`` for ``seconds``, in tenths of a second (a load, not a
    wait for anything); their ids."""
    ids: list[str] = []
    for tick in range(round(seconds * 10)):
        numbers = range(tick * per_second // 10 + 1, (tick + 1) * per_second // 10 + 1)
        await asyncio.gather(*(outbox.put(f"org/o/device/R{n % 50}/power",
                                          env(n, f"R{n % 50}", "pose", 1.7e9 + n))
                               for n in numbers))  # a tenth's callbacks, as they come
        ids += [f"m{n}" for n in numbers]
        await asyncio.sleep(0.1)
    return ids


async def test_paced_at_aws_limits_always_keeps_up_with_more_than_100_a_second(
        tmp_path: Path) -> None:
    """300 callbacks a second through a connection paced at 100 publishes: with ``on``
    the outbox falls behind into a backlog (drained in rounds, newest first); with
    ``always`` what waits behind the pacing goes packed, in order, and never piles up."""
    for mode in ("on", "always"):
        async with rig(tmp_path / mode) as (outbox, inbox, url):
            transport = Metered(MqttSettings.from_url(url, client_id=f"gw-{mode}"))
            publisher = OutboxPublisher(outbox, transport, rate_limit=100,
                                        byte_limit=512 * 1024, frame_topic=FRAME_TOPIC,
                                        frame_live=mode == "always")
            async with transport, running(publisher):
                ids = await feed(outbox, 300, 2.0)
                got = envelopes(await collect(inbox, outbox))
            assert sorted(e["id"] for e in got) == sorted(ids)
            most, _ = transport.worst_second()
            assert most <= 100, most
            if mode == "on":  # frames only in a drain's rounds: it fell behind
                assert publisher.frames > 0
            else:  # a drain would send newest first and mark history
                assert [e["id"] for e in got] == ids
                assert not any(e.get("replay") for e in got)
                assert len(transport.sent) < len(ids) / 3
