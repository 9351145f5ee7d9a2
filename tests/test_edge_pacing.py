"""Every publish of the edge agent's broker connection shares one pace: AWS IoT
Core counts a connection's publishes whoever makes them, so the REST proxy's publishes and
the command answers wait their turn with the outbox's drain instead of going out on top."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx

from bridge.commands import Command, Response
from bridge.envelope import Envelope
from bridge.outbox import Outbox
from bridge.topic import TopicScheme
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.memory import MemoryTransport
from edge_agent import settings as config
from edge_agent.service import EdgeAgent, mqtt_settings

RATE = 100  # AWS IoT Core's publishes a second per connection, the awsiot default
BACKLOG = 300  # more than the publisher's paced backlog threshold (200): a drain
PROXIED, COMMANDS = 25, 5
TOKEN = "edge-proxy-token"


class Metered(MemoryTransport):
    """The agent's broker connection, recording when each publish went out and where."""

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(settings)
        self.sent: list[tuple[float, str]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> asyncio.Future[None]:
        self.sent.append((time.monotonic(), topic))
        return super().publish(topic, payload, qos, retain)


def worst_second(times: list[float]) -> int:
    """The most publishes within any one second."""
    return max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))


async def test_proxy_publishes_and_command_answers_are_paced_with_the_drain(
        tmp_path: Path) -> None:
    broker = f"pace-{uuid.uuid4().hex[:8]}"
    settings = config.load(None, {
        "PUDU_CALLBACK_CODE": "c", "MQTT_URL": f"mqtt://{broker}", "MQTT_BACKEND": "memory",
        "ORG_ID": "acme", "GATEWAY_ID": "gw1", "OUTBOX_PATH": str(tmp_path / "outbox.db"),
        "PUBLISH_RATE_LIMIT": str(RATE), "PROXY_TOKEN": TOKEN})
    # An outage's backlog, waiting when the agent starts.
    async with Outbox(settings.outbox_path) as outbox:
        for n in range(BACKLOG):
            device = f"R{n % 5}"
            await outbox.put(f"org/acme/device/{device}/event", Envelope(
                id=f"m{n}", type="notifyRobotErrorWarning", org="acme", device=device,
                gateway="gw1", ts=1_700_000_000.0 + n, received_at=1_700_000_000.0 + n,
                data={"n": n}, channel="event").to_json(), order=1_700_000_000.0 + n)
    transport = Metered(mqtt_settings(settings, TopicScheme("acme")))
    inbox: asyncio.Queue[InboundMessage] = asyncio.Queue()
    cloud = MemoryTransport(MqttSettings.from_url(f"mqtt://{broker}", client_id="cloud",
                                                  clean_start=True))
    cloud.message_handler = inbox.put_nowait
    async with cloud:
        await cloud.subscribe("org/acme/device/gw1/response", qos=1)
        async with EdgeAgent(settings, transport) as agent, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=agent.admin_app), base_url="http://admin",
                headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
            assert agent.publisher.draining or agent.outbox.depth > 200
            commands = [Command("ping") for _ in range(COMMANDS)]
            for command in commands:
                await cloud.publish(agent.commands.command_topic, command.to_json())
            answers = await asyncio.gather(*(
                admin.post("/mqtt/publish", json={"topic": f"org/acme/device/gw1/app/{n}",
                                                  "payload": {"n": n}})
                for n in range(PROXIED)))
            responses = [Response.from_json((await asyncio.wait_for(inbox.get(), 10)).payload)
                         for _ in commands]
            await asyncio.wait_for(agent.publisher.wait_drained(), 30)
            throttled = agent.publisher.throttled_s
    assert [r.status_code for r in answers] == [200] * PROXIED
    assert {r.message_id for r in responses} == {c.message_id for c in commands}
    paced = [(at, topic) for at, topic in transport.sent if not topic.endswith("/presence")]
    kinds = [topic.split("/")[-1] if "/gw1/" not in topic else topic.split("/")[4]
             for _, topic in paced]
    assert (kinds.count("event"), kinds.count("app"), kinds.count("response")) == (
        BACKLOG, PROXIED, COMMANDS)
    # They went out during the drain, not after it...
    last_event = max(i for i, kind in enumerate(kinds) if kind == "event")
    assert all(i < last_event for i, kind in enumerate(kinds) if kind != "event")
    # ...and, all together, within AWS's limit less the one a second kept for presence.
    assert worst_second([at for at, _ in paced]) <= RATE - 1
    assert throttled > 0
