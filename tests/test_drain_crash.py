"""Batch frames with real agent and callback server processes on Mosquitto: a SIGKILL in
the middle of a batched drain (issue 27), and live bursts with ``BATCH_FRAMES=always``;
every entry ends in the cloud's message log once, whatever the kill cut short."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from bench.samples import envelopes
from bridge.outbox import Outbox
from tests.support.dbutil import query
from tests.support.mqtt_probe import Probe
from tests.support.procs import MosquittoProcess
from tests.support.services import ServiceProcess, callback_server, edge_agent
from tests.support.waiting import eventually

BROKER = "mqtt://127.0.0.1:1883"
BACKLOG = 600


async def fill(path: Path, prefix: str) -> set[str]:
    """The outbox as an outage leaves it: BACKLOG entries of the realistic mix."""
    ids = set()
    async with Outbox(path) as outbox:
        for topic, payload, key in envelopes(BACKLOG, org="acme", gateway="gw1", robots=4,
                                             tag=prefix, prefix=prefix):
            await outbox.put(topic, payload, compact_key=key)
            ids.add(payload.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode())
    return ids


def logged(db: str) -> list[str]:
    try:
        return [r["id"] for r in query(db, "SELECT id FROM mqtt_message_log")]
    except Exception:  # the table is created on the first batch
        return []


@pytest.mark.integration
def test_sigkill_mid_batched_drain_loses_nothing_and_stores_nothing_twice(
        tmp_path: Path) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    ids = asyncio.run(fill(tmp_path / "outbox-gw1.db", p))
    assert len(ids) == BACKLOG
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p), \
            Probe(BROKER, f"{p}/org/acme/device/gw1/batch") as frames_seen:
        # One frame of 50 a round, 2 frames/s: the drain takes several seconds.
        agent = edge_agent(tmp_path, BROKER, org="acme", TOPIC_PREFIX=p, BATCH_FRAMES="on",
                           PUBLISH_WINDOW="5", PUBLISH_RATE_LIMIT="2")
        agent.start()
        frames_seen.wait_for(3, timeout=30)
        agent.kill()  # SIGKILL: no shutdown code runs
        cut = len(set(logged(db)))
        assert cut < BACKLOG, "the drain was over before the kill"
        agent.env["PUBLISH_RATE_LIMIT"] = "0"
        agent.start()
        eventually(lambda: len(set(logged(db))), accept=lambda n: n >= BACKLOG, within=60,
                   every=0.1, what=f"all {BACKLOG} stored after the restart")
        agent.stop()
        rows = logged(db)
        assert sorted(rows) == sorted(ids)  # each once: nothing lost, nothing twice
        assert query(db, "SELECT COUNT(*) AS n FROM mqtt_dead_letters")[0]["n"] == 0
    print(f"killed with {cut} of {BACKLOG} stored; all {BACKLOG} stored once after restart")


async def burst(agent: ServiceProcess, n: int, first: int = 0) -> list[str]:
    """``n`` power callbacks of 20 robots (numbered from ``first``), 20 at a time; the
    message ids answered."""
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=agent.url, limits=limits, timeout=30) as client:
        async def one(i: int) -> str:
            body = {"callback_type": "notifyRobotPower",
                    "data": {"sn": f"R{i % 20}", "power": i % 100,
                             "timestamp": 1_700_000_000_000 + i}}
            r = await client.post("/api/pudu/webhook", json=body,
                                  headers={"CallbackCode": "test-code"})
            assert r.status_code == 200, r.text
            return str(r.json()["data"]["message_id"])
        return await asyncio.gather(*(one(i) for i in range(first, first + n)))


@pytest.mark.integration
def test_with_batch_frames_always_a_live_burst_reaches_the_cloud_packed_and_whole(
        tmp_path: Path) -> None:
    """BATCH_FRAMES=always: callbacks that wait for the publisher (here: a burst while the
    broker restarts, short of a backlog's drain) go out in batch frames, and the callback
    server stores each of them once. Then a lone callback goes out on its own topic."""
    p = f"t{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    broker = MosquittoProcess(tmp_path / "broker").start()  # keeps sessions across a stop
    try:
        with callback_server(tmp_path, broker.url, db, TOPIC_PREFIX=p), \
                edge_agent(tmp_path, broker.url, org="acme", TOPIC_PREFIX=p,
                           BATCH_FRAMES="always") as agent:
            broker.stop()
            ids = asyncio.run(burst(agent, 300))  # durable in the outbox meanwhile
            assert agent.health()["outbox_depth"] == 300
            broker.start()
            eventually(lambda: len(logged(db)), accept=lambda n: n >= 300, within=30,
                       every=0.1, what="all 300 stored")
            published = agent.health()["published"]
            frames = agent.metric("edge_batch_frames_total ")
            with Probe(broker.url, f"{p}/org/acme/device/+/power") as alone:
                ids += asyncio.run(burst(agent, 1, first=300))
                alone.wait_for(1, timeout=10)
            eventually(lambda: len(logged(db)), accept=lambda n: n >= 301, within=10,
                       every=0.1, what="the lone callback stored")
    finally:
        broker.close()
    assert sorted(logged(db)) == sorted(ids)  # each once
    assert query(db, "SELECT COUNT(*) AS n FROM mqtt_dead_letters")[0]["n"] == 0
    assert frames > 0 and published <= 10, (published, frames)
