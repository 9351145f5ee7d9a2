"""A full disk under the outbox is an outage, not a crash (issue 24).

The outbox sits on a 2 MiB tmpfs the test mounts (root only; CI runs as root), the broker
is away, callbacks are posted until the disk is full: every one is answered 200 or 503
within a second, health says why it is degraded, and once the tmpfs is made larger the
same agent accepts again within 5 s. Every callback answered 200 reaches the broker once
it is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from bridge.errors import OutboxUnwritableError
from bridge.outbox import Outbox
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.memory import MemoryBroker, MemoryTransport
from edge_agent.publisher import OutboxPublisher
from tests.support.mqtt_probe import Probe, Seen
from tests.support.procs import MosquittoProcess
from tests.support.services import edge_agent
from tests.support.waiting import eventually, eventually_async

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")

CODE = {"CallbackCode": "test-code"}


def event(i: int) -> bytes:
    """An event (never compacted), padded so a few hundred fill the disk."""
    return json.dumps({"callback_type": "robotErrorWarning", "data": {
        "sn": f"DISK{i % 7}", "error_level": "WARNING", "error_type": "LostLocalization",
        "error_detail": "x" * 3000 + str(i), "error_id": f"disk-{i}",
        "timestamp": int(time.time())}}).encode()


def post(client: httpx.Client, url: str, body: bytes) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = client.post(url + "/api/pudu/webhook", headers=CODE, content=body)
    return r, time.monotonic() - started


def wait_ids(probe: Probe, ids: set[str], timeout: float = 60) -> set[str]:
    """Block until every envelope id in ``ids`` arrived; returns what arrived."""
    def arrived(messages: list[Seen]) -> set[str]:
        return {json.loads(m.payload)["id"] for m in messages if "/DISK" in m.topic}

    return arrived(probe.wait_until(lambda got: ids <= arrived(got), "every envelope id",
                                    timeout=timeout))


def test_a_full_disk_is_answered_503_and_accepted_again_once_space_returns(
        tmp_path: Path, small_fs: Path) -> None:
    org = f"disk{uuid.uuid4().hex[:8]}"
    broker = MosquittoProcess(tmp_path / "mosquitto", persistence=True)
    probe = Probe(broker.url, f"org/{org}/#", client_id=f"probe-{org}", persistent=True)
    broker.start()  # once, so the probe's session queues what arrives while it is away
    probe.start()
    probe.stop()
    broker.stop()
    accepted: set[str] = set()
    try:
        with edge_agent(tmp_path, broker.url, org=org,
                        OUTBOX_PATH=str(small_fs / "outbox.db")) as agent, \
                httpx.Client(timeout=10) as client:
            refused = 0
            for i in range(5000):
                r, took = post(client, agent.url, event(i))
                assert r.status_code in (200, 503), r.text
                assert took < 1.0, f"answer {i} took {took:.2f} s"
                if r.status_code == 200:
                    accepted.add(r.json()["data"]["message_id"])
                    continue
                assert int(r.headers["Retry-After"]) > 0
                assert r.json()["status"] == "error"
                refused += 1
                if refused >= 50:
                    break
            assert refused >= 50, "the disk never filled"
            assert len(accepted) > 50
            health = agent.health()
            assert health["status"] == "degraded"
            assert not health["outbox_writable"]
            assert any("disk full" in reason for reason in health["reasons"]), health
            assert health["outbox_free_bytes"] < 256 * 1024
            assert "edge_outbox_writable 0.0" in httpx.get(agent.admin_url + "/metrics").text

            subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
            i += 1

            def attempt() -> httpx.Response:  # a client's retry
                r, took = post(client, agent.url, event(i))
                assert took < 1.0 and r.status_code in (200, 503)
                return r

            # the same agent, no restart: the writer's retry finds the space
            r = eventually(attempt, accept=lambda r: r.status_code == 200,
                           within=5.0, every=0.1,
                           what="accepting after the remount")
            accepted.add(r.json()["data"]["message_id"])
            assert agent.health()["outbox_writable"]
            assert agent.health()["outbox_free_bytes"] > 32 * 2**20

            broker.start()
            probe.start()
            try:
                seen = wait_ids(probe, accepted)
            finally:
                probe.stop()
            assert accepted <= seen
            agent.wait_health("outbox_depth", 0)
            assert agent.health()["status"] == "healthy"
    finally:
        broker.close()


async def test_removals_made_while_the_disk_is_full_are_kept_and_applied_later(
        small_fs: Path) -> None:
    async with Outbox(small_fs / "outbox.db", retry_seconds=0.1) as outbox:
        for i in range(5000):
            try:
                await outbox.put("t/a", b"x" * 3000 + str(i).encode())
            except OutboxUnwritableError as exc:
                assert "disk full" in exc.reason
                break
        assert outbox.unwritable is not None
        with pytest.raises(OutboxUnwritableError):  # at once, not through the writer
            await asyncio.wait_for(outbox.put("t/a", b"refused"), 0.5)
        stored = outbox.depth
        acked = [e.seq for e in await outbox.peek(0, 40)]
        outbox.remove(acked)  # PUBACKs arriving while the disk is full
        # Not written yet, and not handed out again meanwhile.
        assert not set(acked) & {e.seq for e in await outbox.peek(0, 40)}
        await asyncio.to_thread(
            subprocess.run, ["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
        await eventually_async(lambda: outbox.unwritable is None, within=5)
        assert await outbox.put("t/a", b"accepted again") is not None
        await outbox.sync()
        left = [e.seq for e in await outbox.peek(0, 10_000)]
    assert outbox.depth == stored - len(acked) + 1 == len(left)
    assert not set(acked) & set(left)


async def test_a_backlog_drains_while_the_disk_is_full(small_fs: Path) -> None:
    """A broker back after an outage that filled the disk: the backlog goes out, the
    publisher does not fail on removals that cannot be written yet, and once space returns
    they are, and nothing acknowledged is sent twice meanwhile."""
    name = f"full-{uuid.uuid4().hex[:8]}"
    MemoryBroker.named(name)
    inbox: asyncio.Queue[InboundMessage] = asyncio.Queue()
    watcher = MemoryTransport(MqttSettings.from_url(f"mqtt://{name}", client_id="watch"))
    watcher.message_handler = inbox.put_nowait
    async with Outbox(small_fs / "outbox.db", retry_seconds=0.1) as outbox, watcher:
        await watcher.subscribe("t/#", qos=1)
        with pytest.raises(OutboxUnwritableError):
            for i in range(5000):
                await outbox.put("t/a", b"x" * 3000 + str(i).encode())
        stored = outbox.depth
        transport = MemoryTransport(MqttSettings.from_url(f"mqtt://{name}", client_id="gw"))
        publisher = OutboxPublisher(outbox, transport, window=20, backlog=10)
        async with transport:
            task = asyncio.create_task(publisher.run(), name="publisher")
            got = [await asyncio.wait_for(inbox.get(), 10) for _ in range(stored)]
            assert not task.done(), task
            assert outbox.unwritable is not None  # nothing removed yet: the disk is full
            await asyncio.to_thread(
                subprocess.run, ["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
            await asyncio.wait_for(publisher.wait_drained(), 10)
            assert not task.done(), task
            task.cancel()
    assert len({m.payload for m in got}) == stored
    assert inbox.empty(), f"{inbox.qsize()} sent twice"
