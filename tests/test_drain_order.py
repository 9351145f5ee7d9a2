"""Draining a backlog after an outage (issue 27), on the in-process broker with a rate
limit: newest state and events first, superseded positions after as ``replay`` history,
pacing under the limits, batch frames, fresh callbacks in the round after they arrive."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge import frames
from bridge.envelope import Envelope
from bridge.outbox import Outbox, OutboxEntry
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
             "event": "notifyRobotErrorWarning", "power": "notifyRobotPower",
             "move": "notifyRobotMoveState"}
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


class Rounds(Outbox):
    """An outbox that keeps each drain round's plan (the ids, in the order sent), so a
    test can say which round an entry went out in. ``asked``: rounds asked for so far,
    counted as each is asked for (a round planned while a put commits may or may not
    see it; one asked for after the put returned does)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.asked = 0
        self.plans: dict[int, list[str]] = {}

    async def drain_plan(self, limit: int = 500) -> list[tuple[OutboxEntry, bool]]:
        round_, self.asked = self.asked, self.asked + 1
        plan = await super().drain_plan(limit)
        self.plans[round_] = [json.loads(entry.payload)["id"] for entry, _ in plan]
        return plan

    def round_of(self, ident: str) -> tuple[int, int]:
        """The round that sent ``ident`` and its place in that round."""
        return next((r, ids.index(ident)) for r, ids in self.plans.items() if ident in ids)


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, kind: type[Outbox] = Outbox) -> AsyncIterator[
        tuple[Outbox, asyncio.Queue[InboundMessage], str]]:
    name = f"drain-{uuid.uuid4().hex[:8]}"
    MemoryBroker.named(name)
    inbox: asyncio.Queue[InboundMessage] = asyncio.Queue()
    watcher = MemoryTransport(MqttSettings.from_url(f"mqtt://{name}", client_id="cloud",
                                                    clean_start=True))
    watcher.message_handler = inbox.put_nowait
    async with kind(tmp_path / "outbox.db") as outbox, watcher:
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


async def fleet(outbox: Outbox, robots: int, events: int) -> list[str]:
    """A backlog of every state channel of ``robots`` robots three times over (each
    robot's ``status``, ``pose``, ``power`` and ``move``: 4 state topics a robot), then
    ``events`` events, robot after robot; the ids in the order put."""
    ids, n, t0 = [], 0, 1_700_000_000.0
    for k in range(3):
        for r in range(robots):
            for channel in STATE:
                n += 1
                await outbox.put(f"org/o/device/R{r}/{channel}",
                                 env(n, f"R{r}", channel, t0 + k), order=t0 + k)
                ids.append(f"m{n}")
    for e in range(events):
        n, dev = n + 1, f"R{e % robots}"
        await outbox.put(f"org/o/device/{dev}/event", env(n, dev, "event", t0 + 10 + e),
                         order=t0 + 10 + e)
        ids.append(f"m{n}")
    return ids


@pytest.mark.parametrize(("robots", "events", "channel"), [
    (100, 0, "status"),  # behind 400 state topics' newest: 4 rounds before the fix
    (10, 600, "event"),  # behind 600 older events of 10 robots: 7 rounds before the fix
])
async def test_fresh_callbacks_during_a_drain_go_out_in_the_round_after_they_arrive(
        tmp_path: Path, robots: int, events: int, channel: str) -> None:
    """A fresh callback goes out in the first round planned after it arrived, ahead of
    the backlog's newest states and events, behind only its own robot's older events;
    every robot's events stay in the order put and what merges into state stays in
    robot-time order per robot and channel."""
    async with rig(tmp_path, Rounds) as (outbox, inbox, url):
        assert isinstance(outbox, Rounds)
        ids = await fleet(outbox, robots, events)
        transport = Metered(MqttSettings.from_url(url, client_id="gw"))
        # paced so that a round is one window (unpaced, a round is 5,000 entries)
        publisher = OutboxPublisher(outbox, transport, window=100, rate_limit=400)
        async with transport, running(publisher):
            first = [await asyncio.wait_for(inbox.get(), 10) for _ in range(50)]
            await outbox.put(f"org/o/device/R1/{channel}", env(10_000, "R1", channel, 2e9),
                             order=2e9)  # into the drain's first round
            after = outbox.asked  # the rounds asked for before the put returned
            got = envelopes(first + await collect(inbox, outbox))
        round_, place = outbox.round_of("m10000")
        assert round_ <= after, f"sent in round {round_}, the first after it arrived is {after}"
        assert len(outbox.plans) > round_ + 2, "the drain still had a backlog"
        ahead = outbox.plans[round_][:place]  # only its robot's older events go first
        mine = {e["id"] for e in got if e["device"] == "R1" and e["channel"] == "event"}
        assert set(ahead) <= mine, ahead[:5]
        assert sorted(e["id"] for e in got) == sorted([*ids, "m10000"])
        for dev in {e["device"] for e in got}:  # each robot's events in the order put
            put = [f"m{n}" for n in sorted(int(e["id"][1:]) for e in got
                                           if e["device"] == dev and e["channel"] == "event")]
            assert [e["id"] for e in got if e["device"] == dev and e["channel"] == "event"] \
                == put, dev
        merged: dict[tuple[str, str], float] = {}
        for e in got:  # what merges into state: robot-time order per robot and channel
            if e["channel"] in STATE and not e.get("replay"):
                stream = (e["device"], e["channel"])
                assert e["ts"] >= merged.get(stream, e["ts"]), (stream, e["id"])
                merged[stream] = e["ts"]
        if channel in STATE:
            assert merged[("R1", channel)] == 2e9


async def test_a_fresh_event_takes_its_robots_older_ones_along_and_a_stale_state_goes_as_history(
        tmp_path: Path) -> None:
    """Round by round, as the publisher asks: what arrived since the last round goes
    first; a fresh event only after its own robot's older events (other robots' wait);
    a fresh state older by robot time than the newest of its topic already sent goes at
    once, marked history, so the cloud never merges it over the newer one."""
    async with Outbox(tmp_path / "outbox.db") as outbox:
        for n, (dev, channel, ts) in enumerate([
                ("R0", "status", 100), ("R0", "status", 200), ("R1", "event", 1),
                ("R2", "event", 2), ("R1", "event", 3), ("R1", "status", 100),
                ("R2", "status", 100)], start=1):
            await outbox.put(f"org/o/device/{dev}/{channel}", env(n, dev, channel, ts),
                             order=ts)

        async def round_(limit: int) -> list[tuple[str, bool]]:
            plan = await outbox.drain_plan(limit)
            outbox.remove(entry.seq for entry, _ in plan)  # as once acknowledged
            return [(json.loads(entry.payload)["id"], history) for entry, history in plan]

        # newest states first, the last accepted first (a callback that came as the
        # drain began is no older news than the rest of the backlog's)
        assert await round_(2) == [("m7", False), ("m6", False)]
        await outbox.put("org/o/device/R2/status", env(8, "R2", "status", 50), order=50)
        await outbox.put("org/o/device/R1/event", env(9, "R1", "event", 4), order=4)
        assert await round_(4) == [("m8", True), ("m3", False), ("m5", False), ("m9", False)]
        assert await round_(10) == [("m2", False), ("m4", False), ("m1", True)]
        assert await outbox.drain_plan(10) == []


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
