"""SIGKILL of the edge agent in the middle of a batched drain (issue 27): real agent and
callback server processes on Mosquitto; every entry of the backlog ends in the cloud's
message log once, whatever the kill cut short."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from bench.samples import envelopes
from bridge.outbox import Outbox
from tests.support.dbutil import query
from tests.support.mqtt_probe import Probe
from tests.support.services import callback_server, edge_agent
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
