"""The edge agent in one process on the memory broker (no Mosquitto): the webhook's accept
path end to end, and the command executor's one answer per command."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from bridge.commands import Command, Response
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.memory import MemoryBroker, MemoryTransport
from edge_agent import settings as config
from edge_agent.service import EdgeAgent

CODE = {"CallbackCode": "in-process-code"}


@asynccontextmanager
async def agent_and_watcher(tmp_path: Path) -> AsyncIterator[
        tuple[EdgeAgent, httpx.AsyncClient, asyncio.Queue[InboundMessage]]]:
    broker = f"edge-{uuid.uuid4().hex[:8]}"
    settings = config.load(None, {
        "PUDU_CALLBACK_CODE": CODE["CallbackCode"], "MQTT_URL": f"mqtt://{broker}",
        "MQTT_BACKEND": "memory", "ORG_ID": "acme", "GATEWAY_ID": "gw1",
        "OUTBOX_PATH": str(tmp_path / "outbox.db")})
    inbox: asyncio.Queue[InboundMessage] = asyncio.Queue()
    watcher = MemoryTransport(MqttSettings.from_url(f"mqtt://{broker}", client_id="watch",
                                                    clean_start=True))
    watcher.message_handler = inbox.put_nowait
    async with watcher:
        await watcher.subscribe("org/acme/#", qos=1)
        async with EdgeAgent(settings) as agent, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=agent.app), base_url="http://gw") as client:
            yield agent, client, inbox


async def next_on(inbox: asyncio.Queue[InboundMessage], suffix: str) -> InboundMessage:
    while True:
        message = await asyncio.wait_for(inbox.get(), 5)
        if message.topic.endswith(suffix):
            return message


async def test_a_webhook_is_committed_then_published_as_its_envelope(tmp_path: Path) -> None:
    async with agent_and_watcher(tmp_path) as (_, client, inbox):
        body = {"callback_type": "notifyRobotPower",
                "data": {"sn": "R1", "power": 42, "charge_state": "Charging"}}
        first = await client.post("/api/pudu/webhook", headers=CODE, json=body)
        again = await client.post("/api/pudu/webhook", headers=CODE, json=body)
        refused = await client.post("/api/pudu/webhook", headers=CODE, content=b"[" * 100)
        message = await next_on(inbox, "/device/R1/power")
    assert first.status_code == 200 and not first.json()["data"]["duplicate"]
    assert again.json()["data"]["duplicate"]  # a retry: answered, not published again
    assert refused.status_code == 400 and "64 levels" in refused.json()["message"]
    env = json.loads(message.payload)
    assert (env["org"], env["device"], env["gateway"]) == ("acme", "R1", "gw1")
    assert env["data"] == {"battery_level": 42, "charge_state": "charging"}


async def test_every_command_gets_exactly_one_answer(tmp_path: Path) -> None:
    async with agent_and_watcher(tmp_path) as (agent, _, inbox):
        commands = [Command("ping"), Command("nope"), Command("get_status")]
        for command in commands:
            await agent.transport.publish(agent.commands.command_topic, command.to_json())
        answers = [Response.from_json((await next_on(inbox, "/device/gw1/response")).payload)
                   for _ in commands]
        # A marker sent after all three were answered: the next answer is its own, so no
        # command was answered twice in the meantime.
        marker = Command("ping")
        await agent.transport.publish(agent.commands.command_topic, marker.to_json())
        after = Response.from_json((await next_on(inbox, "/device/gw1/response")).payload)
        assert after.message_id == marker.message_id
    by_id = {a.message_id: a for a in answers}
    assert set(by_id) == {c.message_id for c in commands}
    assert by_id[commands[0].message_id].status == "success"
    assert by_id[commands[1].message_id].status == "error"
    assert "unknown command" in (by_id[commands[1].message_id].error or "")
    assert by_id[commands[2].message_id].result["gateway_id"] == "gw1"


async def test_a_robot_named_like_the_gateway_is_a_robot_a_shop_callback_is_not(
        tmp_path: Path) -> None:
    async with agent_and_watcher(tmp_path) as (agent, client, inbox):
        shop = {"callback_type": "mapElementChange", "data": {"shop_id": 7, "sn": ""}}
        robot = {"callback_type": "notifyRobotPower", "data": {"sn": "gw1", "power": 40}}
        for body in (robot, shop):  # the shop-level one is newer: it must not count
            r = await client.post("/api/pudu/webhook", headers=CODE, json=body)
            assert r.status_code == 200, r.text
        await next_on(inbox, "/device/gw1/power")
        await next_on(inbox, "/device/gw1/callback/mapElementChange")  # the gateway's topic
        # get_robots (the gateway command) lists the robot "gw1" with its own state only.
        assert agent.robots == {"gw1": agent.robots["gw1"]}
        assert agent.robots["gw1"]["battery_level"] == 40
        assert agent.robots["gw1"].get("last_type") == "notifyRobotPower"


def sample(metrics: str, name: str) -> float:
    """The value of one sample line of a Prometheus exposition."""
    line = next(ln for ln in metrics.splitlines() if ln.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


async def test_metrics_bound_callback_types_and_estimate_the_drain(tmp_path: Path) -> None:
    async with agent_and_watcher(tmp_path) as (agent, client, inbox):
        admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=agent.admin_app),
                                  base_url="http://admin")
        broker = MemoryBroker.named(agent.settings.mqtt_url.removeprefix("mqtt://"))
        broker.stop()  # the uplink is down: the backlog cannot drain
        for kind in ("notifyRobotPower", "someVendorExtension", "robotStatus"):
            r = await client.post("/api/pudu/webhook", headers=CODE, json={
                "callback_type": kind, "data": {"sn": "R1", "power": 42, "run_state": "IDLE"}})
            assert r.status_code == 200, r.text
        away = (await admin.get("/metrics")).text
        broker.start()
        await next_on(inbox, "/callback/someVendorExtension")
        await asyncio.wait_for(agent.publisher.wait_drained(), 5)
        drained = (await admin.get("/metrics")).text
        await admin.aclose()
    assert sample(away, 'edge_webhooks_total{outcome="accepted",type="other"}') == 1.0
    assert sample(away, 'edge_webhooks_total{outcome="accepted",type="robotStatus"}') == 1.0
    assert "someVendorExtension" not in away  # an undocumented type makes no series
    assert sample(away, "edge_outbox_depth") == 3.0
    assert sample(away, "edge_outbox_drain_estimate_seconds") == math.inf  # not draining
    assert sample(drained, "edge_outbox_drain_estimate_seconds") == 0.0
