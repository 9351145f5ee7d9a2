"""The embedded broker does what `make run` needs: QoS 1, retained, will, persistent session."""

from __future__ import annotations

import asyncio
import uuid

from bridge.embedded_broker import EmbeddedBroker
from bridge.transport import InboundMessage, MqttSettings, Will
from bridge.transport.paho import PahoTransport
from tests.services import pick_port


def settings(url: str, name: str, **kw: object) -> MqttSettings:
    return MqttSettings.from_url(url, client_id=f"{name}-{uuid.uuid4().hex[:6]}", **kw)


async def test_qos1_retained_will_and_wildcards() -> None:
    async with EmbeddedBroker("127.0.0.1", pick_port()) as broker:
        got: asyncio.Queue[InboundMessage] = asyncio.Queue()
        will = Will("org/a/device/gw/presence", b"offline", qos=1, retain=True)
        birth = Will("org/a/device/gw/presence", b"online", qos=1, retain=True)
        edge = PahoTransport(settings(broker.url, "edge", will=will, birth=birth))
        async with edge:
            await asyncio.wait_for(edge.wait_connected(), 5)
            await asyncio.wait_for(edge.publish("org/a/device/R1/status", b"s1", qos=1), 5)
            async with PahoTransport(settings(broker.url, "sub", clean_start=True)) as sub:
                sub.message_handler = got.put_nowait
                await asyncio.wait_for(sub.wait_connected(), 5)
                await sub.subscribe("org/+/device/+/#", qos=1)
                presence = await asyncio.wait_for(got.get(), 5)  # retained birth
                assert (presence.topic, presence.payload, presence.retain) == (
                    "org/a/device/gw/presence", b"online", True)
                await asyncio.wait_for(edge.publish("org/a/device/R1/pose", b"p1", qos=1), 5)
                msg = await asyncio.wait_for(got.get(), 5)
                assert (msg.topic, msg.payload) == ("org/a/device/R1/pose", b"p1")
                # an abrupt loss of the edge connection: the broker publishes the will
                edge._client.socket().close()  # type: ignore[union-attr]
                offline = await asyncio.wait_for(got.get(), 10)
                assert (offline.topic, offline.payload) == ("org/a/device/gw/presence",
                                                            b"offline")
