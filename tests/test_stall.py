"""A stalled stream is visible: health turns ``degraded`` with the reason once the oldest
unacknowledged message is older than ``STALL_SECONDS``, and ``/metrics`` says how old."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bridge.transport import MqttSettings
from bridge.transport.memory import MemoryTransport
from callback_server import settings as cb_config
from callback_server.service import CallbackServer
from tests.support.waiting import eventually_async

TOKEN = "admin-token"


async def test_a_hung_database_write_turns_health_degraded_with_the_reason(
        tmp_path: Path) -> None:
    broker = f"mqtt://b{uuid.uuid4().hex[:8]}"
    settings = cb_config.load(None, {
        "MQTT_URL": broker, "MQTT_BACKEND": "memory", "STALL_SECONDS": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}", "PROXY_TOKEN": TOKEN})
    async with CallbackServer(settings) as server:
        release, write = asyncio.Event(), server.store.write_batch

        async def hung(items: Any) -> Any:  # a write that hangs (not fails) until released
            await release.wait()
            return await write(items)

        server.store.write_batch = hung  # type: ignore[method-assign]
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                                   base_url="http://cb")
        publisher = MemoryTransport(MqttSettings.from_url(broker, client_id="p",
                                                          clean_start=True))
        async with client, publisher:
            env = {"v": 1, "id": "x1", "type": "notifyRobotPower", "channel": "power",
                   "org": "acme", "device": "R1", "ts": time.time(), "data": {}, "raw": {}}
            await publisher.publish("org/acme/device/R1/power", json.dumps(env).encode(), qos=1)

            async def health() -> dict[str, Any]:
                body: dict[str, Any] = (await client.get(
                    "/callback/health", headers={"Authorization": f"Bearer {TOKEN}"})).json()
                return body

            first = await eventually_async(health, accept=lambda h: h["unacked"] == 1,
                                         what="one message unacknowledged", within=5)
            assert first["status"] == "healthy", first  # waiting, but not yet past the bound
            stalled = await eventually_async(health, accept=lambda h: h["status"] == "degraded",
                                         what="health degraded", within=5)
            assert stalled["oldest_unacked_seconds"] > 1 and stalled["unacked"] == 1
            assert any("oldest unacknowledged message" in r and "STALL_SECONDS=1" in r
                       for r in stalled["reasons"]), stalled["reasons"]
            metrics = (await client.get("/metrics",
                                        headers={"Authorization": f"Bearer {TOKEN}"})).text
            age = [line for line in metrics.splitlines()
                   if line.startswith("callback_oldest_unacked_seconds ")]
            assert age and float(age[0].split()[1]) > 1, age
            release.set()  # the database answers again: the stall clears
            healed = await eventually_async(health, accept=lambda h: h["unacked"] == 0,
                                         what="no message unacknowledged", within=5)
            assert healed["status"] == "healthy" and healed["stored"] == 1, healed
