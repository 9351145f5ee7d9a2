"""Bounded per-robot memory on the edge (issue 24): what is kept per robot is dropped once
the robot has been quiet for ROBOT_QUIET_SECONDS, without changing what is published."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from bridge.envelope import Envelope
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.memory import MemoryTransport
from edge_agent import settings as config
from edge_agent.downsample import Downsampler, Verdict
from edge_agent.robot_memory import RobotMemory
from edge_agent.service import EdgeAgent
from tests.support.waiting import eventually_async

CODE = {"CallbackCode": "memory-code"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_quiet_robot_is_forgotten_everywhere_and_a_talking_one_is_not() -> None:
    clock = Clock()
    memory = RobotMemory(100, clock=clock)
    kept: dict[str, int] = {}
    memory.hold("kept", lambda sn: kept.pop(sn, None), lambda: len(kept))
    for sn in ("A", "B", "C"):
        memory.heard(sn)
        kept[sn] = 1
    clock.now += 60
    memory.heard("B")  # B talks on
    clock.now += 50
    assert memory.sweep() == 2  # A and C: quiet for 110 s
    assert kept == {"B": 1} and memory.states() == {"heard": 1, "kept": 1}
    clock.now += 49
    assert memory.sweep() == 0  # B was heard 99 s ago
    clock.now += 1
    assert memory.sweep() == 1 and memory.states() == {"heard": 0, "kept": 0}


async def test_forgetting_changes_nothing_the_downsampler_decides_within_the_quiet_time(
        tmp_path: Path) -> None:
    from bridge.outbox import Outbox

    clock = Clock()
    async with Outbox(tmp_path / "o.db") as outbox:
        down = Downsampler(outbox, {"pose": 5}, clock=clock)
        memory = RobotMemory(3600, clock=clock)
        memory.hold("downsampler", down.forget, lambda: len(down))
        memory.heard("R1")
        assert down.offer("pose:R1", "pose", 500.0) is Verdict.PUBLISH
        clock.now += 1800
        memory.sweep()  # not quiet long enough: a late retry is still superseded
        assert down.offer("pose:R1", "pose", 490.0) is Verdict.SUPERSEDED
        clock.now += 3600
        memory.sweep()
        assert len(down) == 0
        # Back after a day: its first message is published at once, as for a new robot.
        assert down.offer("pose:R1", "pose", 9000.0) is Verdict.PUBLISH


@asynccontextmanager
async def agent(tmp_path: Path, **extra: str) -> AsyncIterator[
        tuple[EdgeAgent, httpx.AsyncClient, list[InboundMessage]]]:
    broker = f"mem-{uuid.uuid4().hex[:8]}"
    settings = config.load(None, {
        "PUDU_CALLBACK_CODE": CODE["CallbackCode"], "MQTT_URL": f"mqtt://{broker}",
        "MQTT_BACKEND": "memory", "ORG_ID": "acme", "GATEWAY_ID": "gw1",
        "OUTBOX_PATH": str(tmp_path / "outbox.db"), **extra})
    seen: list[InboundMessage] = []
    watcher = MemoryTransport(MqttSettings.from_url(f"mqtt://{broker}", client_id="watch",
                                                    clean_start=True))
    watcher.message_handler = seen.append
    async with watcher:
        await watcher.subscribe("org/acme/device/+/pose", qos=1)
        async with EdgeAgent(settings) as edge, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=edge.app), base_url="http://gw",
                headers=CODE) as client:
            yield edge, client, seen


def pose(sn: str, t: float) -> dict[str, Any]:
    return {"callback_type": "notifyRobotPose",
            "data": {"sn": sn, "x": 1.0, "y": 2.0, "yaw": 0.5, "notify_timestamp": int(t * 1000)}}


async def test_50000_robot_ids_then_quiet_leave_no_state_behind(tmp_path: Path) -> None:
    """What each webhook does to per-robot state (the downsampler's verdict, the agent's
    note of the robot), for 50,000 ids at once; the real webhook path is the next test."""
    n = 50_000
    async with agent(tmp_path, MIN_INTERVAL_SECONDS="pose=30",
                     ROBOT_QUIET_SECONDS="8") as (edge, _, _seen):
        t = time.time()
        for i in range(n):
            sn = f"R{i:06d}"
            assert edge.downsampler.offer(f"pose:{sn}", "pose", t) is Verdict.PUBLISH
            edge.note_robot(Envelope(id=f"m{i}", type="notifyRobotPose", org="acme",
                                     device=sn, gateway="gw1", ts=t, received_at=t,
                                     data={"x": 1.0, "y": 2.0}))
        states = edge.robot_memory.states()
        await eventually_async(lambda: sum(edge.robot_memory.states().values()) == 0, within=30)
        health = edge.health()
    assert states["robots"] == states["heard"] == n and states["downsampler"] >= n
    assert health["robot_states"] == {"heard": 0, "robots": 0, "downsampler": 0, "poller": 0,
                                       "clocks": 0}  # (issue 24: the ordering state too)
    assert edge.robot_memory.forgotten == n


async def test_webhooks_of_many_robots_then_quiet_leave_no_state_and_all_are_published(
        tmp_path: Path) -> None:
    n = 1000
    async with agent(tmp_path, MIN_INTERVAL_SECONDS="pose=30",
                     ROBOT_QUIET_SECONDS="10") as (edge, client, seen):
        t = time.time()
        for start in range(0, n, 250):
            answers = await asyncio.gather(*(
                client.post("/api/pudu/webhook", json=pose(f"W{i:05d}", t))
                for i in range(start, start + 250)))
            assert {a.status_code for a in answers} == {200}
        states = edge.robot_memory.states()
        await eventually_async(lambda: sum(edge.robot_memory.states().values()) == 0, within=40)
        await asyncio.wait_for(edge.publisher.wait_drained(), 30)
        again = await client.post("/api/pudu/webhook", json=pose("W00000", t + 60))
        await eventually_async(lambda: len(seen) == n + 1)
    assert states["robots"] == states["heard"] == n and states["downsampler"] >= n
    assert len({json.loads(m.payload)["device"] for m in seen}) == n  # every one published
    assert again.status_code == 200  # back after the quiet time: published as new


async def test_a_robot_that_keeps_talking_keeps_its_state(tmp_path: Path) -> None:
    async with agent(tmp_path, MIN_INTERVAL_SECONDS="pose=30",
                     ROBOT_QUIET_SECONDS="0.5") as (edge, client, _seen):
        t = time.time()
        for k in range(8):  # for 4 quiet times, every 0.25 s
            r = await client.post("/api/pudu/webhook", json=pose("TALK", t + k))
            assert r.status_code == 200
            await asyncio.sleep(0.25)  # the robot's own cadence, not synchronisation
        # a late retry, older than what was published: still superseded (not forgotten)
        late = await client.post("/api/pudu/webhook", json=pose("TALK", t - 5))
        assert "superseded" in late.json()["message"]
        assert edge.robot_memory.states()["robots"] == 1
