"""Answers fit the transport; names fit the topic (issue 24), on the memory broker held to
AWS IoT Core's limits (128 KiB a payload, 256 bytes and 7 slashes a topic)."""

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

from bridge.commands import Command, CommandClient
from bridge.envelope import Envelope
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.awsiot import MAX_PAYLOAD, check_aws_limits
from bridge.transport.memory import MemoryTransport
from edge_agent import config_checks
from edge_agent import settings as config
from edge_agent.service import EdgeAgent, mqtt_settings

CODE = {"CallbackCode": "limits-code"}


class AwsLimitedMemory(MemoryTransport):
    """The memory broker's client, refusing what AWS IoT Core would (its real checks)."""

    max_payload = MAX_PAYLOAD

    def check_publish(self, topic: str, payload: bytes, qos: int) -> None:
        check_aws_limits(topic, payload, qos)


@asynccontextmanager
async def aws_like(tmp_path: Path, org: str = "acme", **extra: str) -> AsyncIterator[
        tuple[EdgeAgent, httpx.AsyncClient, CommandClient, list[InboundMessage]]]:
    """An agent on an AWS-limited memory broker, its webhook, and a cloud-side command
    client (AWS-limited too) that also records every message under the org."""
    broker = f"limits-{uuid.uuid4().hex[:8]}"
    settings = config.load(None, {
        "PUDU_CALLBACK_CODE": CODE["CallbackCode"], "MQTT_URL": f"mqtt://{broker}",
        "MQTT_BACKEND": "memory", "ORG_ID": org, "GATEWAY_ID": "gw1",
        "OUTBOX_PATH": str(tmp_path / "outbox.db"), **extra})
    agent = EdgeAgent(settings, transport=AwsLimitedMemory(
        mqtt_settings(settings, EdgeAgent(settings).scheme)))
    cloud = AwsLimitedMemory(MqttSettings.from_url(f"mqtt://{broker}", client_id="cloud",
                                                   clean_start=True))
    commands = CommandClient(cloud)
    seen: list[InboundMessage] = []

    def on_message(message: InboundMessage) -> None:
        seen.append(message)
        if message.topic.endswith("/response"):
            commands.on_message(message)

    cloud.message_handler = on_message
    async with cloud:
        await cloud.subscribe(f"org/{org}/#", qos=1)
        async with agent, httpx.AsyncClient(transport=httpx.ASGITransport(app=agent.app),
                                            base_url="http://gw", headers=CODE) as client:
            yield agent, client, commands, seen


async def ask(commands: CommandClient, org: str, name: str, **args: Any) -> dict[str, Any]:
    outcome = await commands.send(org, "gw1", Command(name, args), wait_seconds=30)
    assert outcome.response is not None, f"{name} not answered"
    return outcome.answer()


async def test_get_robots_of_50000_is_answered_in_pages_that_fit(tmp_path: Path) -> None:
    async with aws_like(tmp_path) as (agent, _, commands, seen):
        now = time.time()
        for i in range(50_000):  # what 50,000 robots' webhooks leave behind
            sn = f"PD{i:08d}"
            agent.note_robot(Envelope(
                id=f"m{i}", type="notifyRobotStatus", org="acme", device=sn, gateway="gw1",
                ts=now, received_at=now, data={"status": "idle", "battery_level": 80,
                                                "charge_state": "charging"}))
        pages, robots, cursor = 0, [], None
        while True:
            answer = await ask(commands, "acme", "get_robots",
                               **({} if cursor is None else {"cursor": cursor}))
            assert answer["status"] == "success", answer
            pages += 1
            robots += answer["result"]["items"]
            cursor = answer["result"]["next_cursor"]
            if cursor is None:
                break
        limited = await ask(commands, "acme", "get_robots", limit=3, cursor="PD00000010")
    responses = [m.payload for m in seen if m.topic.endswith("/response")]
    assert max(len(p) for p in responses) <= MAX_PAYLOAD
    assert [r["sn"] for r in robots] == [f"PD{i:08d}" for i in range(50_000)]
    assert pages == len(responses) - 1 > 1
    assert min(len(p) for p in responses[:pages - 1]) > 0.95 * MAX_PAYLOAD  # full pages
    assert [r["sn"] for r in limited["result"]["items"]] == [
        "PD00000011", "PD00000012", "PD00000013"]
    assert limited["result"]["next_cursor"] == "PD00000013"


async def test_an_answer_too_large_for_the_transport_is_an_error_not_a_failed_publish(
        tmp_path: Path) -> None:
    async with aws_like(tmp_path) as (agent, _, commands, _seen):

        async def big(args: dict[str, Any]) -> str:
            return "x" * (MAX_PAYLOAD + 1)

        agent.commands.register("big", big)
        answer = await ask(commands, "acme", "big")
        assert agent.transport.connected
    assert answer["status"] == "error"
    assert "not sent" in answer["error"] and str(MAX_PAYLOAD) in answer["error"]


async def test_a_100_byte_sn_is_published_and_found_under_itself(tmp_path: Path) -> None:
    sn = "S" * 100
    async with aws_like(tmp_path) as (agent, client, commands, seen):
        r = await client.post("/api/pudu/webhook", json={
            "callback_type": "notifyRobotPower", "data": {"sn": sn, "power": 55}})
        assert r.status_code == 200, r.text
        await asyncio.wait_for(agent.publisher.wait_drained(), 10)
        answer = await ask(commands, "acme", "get_robots")
    assert [m.topic for m in seen if m.topic.endswith("/power")] == [
        f"org/acme/device/{sn}/power"]
    envelope = next(json.loads(m.payload) for m in seen if m.topic.endswith("/power"))
    assert envelope["device"] == sn
    assert [(x["sn"], x["battery_level"]) for x in answer["result"]["items"]] == [(sn, 55)]


async def test_a_webhook_whose_topic_aws_would_refuse_is_422_not_set_aside(
        tmp_path: Path) -> None:
    org = "o" * 110  # with a 128-byte sn the topic is over 256 bytes
    async with aws_like(tmp_path, org=org, TOPIC_PREFIX="site/a/") as (agent, client, _, _s):
        too_long = await client.post("/api/pudu/webhook", json={
            "callback_type": "notifyRobotPower", "data": {"sn": "L" * 128, "power": 5}})
        longest = 256 - len(f"site/a/org/{org}/device//power")
        fits = await client.post("/api/pudu/webhook", json={
            "callback_type": "notifyRobotPower", "data": {"sn": "F" * longest, "power": 5}})
        over = await client.post("/api/pudu/webhook", json={
            "callback_type": "notifyRobotPower", "data": {"sn": "L" * 129, "power": 5}})
        await asyncio.wait_for(agent.publisher.wait_drained(), 10)
        rejected = agent.outbox.rejected
    assert too_long.status_code == 422, too_long.text
    assert too_long.json()["field"] == "data.sn" and "256 bytes" in too_long.json()["message"]
    assert fits.status_code == 200, fits.text
    assert over.status_code == 422 and "128 bytes" in over.json()["message"]
    assert rejected == 0  # nothing answered 200 was set aside


def test_check_config_warns_when_the_org_leaves_an_sn_less_than_128_bytes() -> None:
    base = {"PUDU_CALLBACK_CODE": "c", "MQTT_BACKEND": "awsiot", "TOPIC_PREFIX": "site/a/"}
    short = config.load(None, {**base, "ORG_ID": "acme"})
    long = config.load(None, {**base, "ORG_ID": "o" * 110})
    assert config_checks.sn_room(short) == 128
    assert not any("sn" in w for w in config_checks.warnings(short))
    room = 256 - len(f"site/a/org/{'o' * 110}/device//status")
    assert config_checks.sn_room(long) == room
    assert any(f"leave {room} bytes" in w for w in config_checks.warnings(long))
