"""The paho transport against the real Mosquitto on 127.0.0.1:1883."""

from __future__ import annotations

import asyncio
import logging
import uuid

import paho.mqtt.client as mqtt
import pytest

from bridge.backoff import backoff_delay
from bridge.transport import InboundMessage, MqttSettings, Will
from bridge.transport.paho import DELIVER_PER_TURN, PahoTransport

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"


def _settings(name: str, **kw: object) -> MqttSettings:
    return MqttSettings.from_url(BROKER, client_id=f"t-{name}-{uuid.uuid4().hex[:8]}", **kw)


async def test_publish_completes_on_puback_and_subscriber_receives() -> None:
    topic = f"test/{uuid.uuid4().hex}/x"
    got: asyncio.Queue[InboundMessage] = asyncio.Queue()
    async with PahoTransport(_settings("sub", clean_start=True)) as sub, \
            PahoTransport(_settings("pub", clean_start=True)) as pub:
        sub.message_handler = got.put_nowait
        await asyncio.wait_for(sub.wait_connected(), 5)
        await sub.subscribe(topic, qos=1)
        await asyncio.wait_for(pub.wait_connected(), 5)
        await asyncio.wait_for(
            asyncio.gather(*(pub.publish(topic, b"%d" % i, qos=1) for i in range(200))), 10
        )
        received = [(await asyncio.wait_for(got.get(), 5)).payload for _ in range(200)]
        assert received == [b"%d" % i for i in range(200)]  # in order on one connection


async def test_manual_ack_withheld_means_redelivery_after_reconnect() -> None:
    topic = f"test/{uuid.uuid4().hex}/y"
    client_id = f"t-manual-{uuid.uuid4().hex[:8]}"
    first: asyncio.Queue[InboundMessage] = asyncio.Queue()
    settings = MqttSettings.from_url(BROKER, client_id=client_id, manual_ack=True)
    async with PahoTransport(settings) as sub:
        sub.message_handler = first.put_nowait
        await asyncio.wait_for(sub.wait_connected(), 5)
        await sub.subscribe(topic, qos=1)
        async with PahoTransport(_settings("pub", clean_start=True)) as pub:
            await asyncio.wait_for(pub.wait_connected(), 5)
            await pub.publish(topic, b"hold-me", qos=1)
        msg = await asyncio.wait_for(first.get(), 5)
        assert msg.payload == b"hold-me"
        # not acked: leave without acknowledging
    again: asyncio.Queue[InboundMessage] = asyncio.Queue()
    async with PahoTransport(settings) as sub:
        sub.message_handler = again.put_nowait
        msg = await asyncio.wait_for(again.get(), 5)
        assert msg.payload == b"hold-me"
        sub.ack(msg)
        await sub.unsubscribe(topic)
    # clean up the persistent session
    async with PahoTransport(MqttSettings.from_url(BROKER, client_id=client_id,
                                                   clean_start=True)) as c:
        await asyncio.wait_for(c.wait_connected(), 5)


async def test_persistent_session_still_gets_this_runs_subscriptions() -> None:
    """A session from a run with other subscriptions (another prefix) must not hide ours."""
    client_id = f"t-resub-{uuid.uuid4().hex[:8]}"
    old, new = (f"test/{uuid.uuid4().hex}/{name}" for name in ("old", "new"))
    settings = MqttSettings.from_url(BROKER, client_id=client_id)
    async with PahoTransport(settings) as first:
        await asyncio.wait_for(first.wait_connected(), 5)
        await first.subscribe(old, qos=1)
    async with PahoTransport(_settings("pub", clean_start=True)) as pub:
        await asyncio.wait_for(pub.wait_connected(), 5)
        # retained, so it arrives whenever the SUBSCRIBE lands
        await pub.publish(new, b"for-this-run", qos=1, retain=True)
        got: asyncio.Queue[InboundMessage] = asyncio.Queue()
        second = PahoTransport(settings)
        second.message_handler = got.put_nowait
        await second.subscribe(new, qos=1)  # before connecting: goes out on CONNACK
        async with second:
            assert (await asyncio.wait_for(got.get(), 5)).payload == b"for-this-run"
        await pub.publish(new, b"", qos=1, retain=True)
    async with PahoTransport(MqttSettings.from_url(BROKER, client_id=client_id,
                                                   clean_start=True)) as c:
        await asyncio.wait_for(c.wait_connected(), 5)


async def test_subscriptions_go_out_before_the_birth_message(
        caplog: pytest.LogCaptureFixture) -> None:
    """Whoever reacts to our "online" (a cloud sending a gateway a command) must find us
    subscribed: on one connection the broker handles packets in the order they were sent."""
    caplog.set_level(logging.DEBUG, logger="paho.mqtt")  # paho's per-packet lines
    presence = f"test/{uuid.uuid4().hex}/presence"
    birth = Will(presence, b"online", qos=1, retain=False)
    transport = PahoTransport(_settings("birth", clean_start=True, birth=birth))
    await transport.subscribe(f"test/{uuid.uuid4().hex}/command", qos=1)
    async with transport:
        await asyncio.wait_for(transport.wait_connected(), 5)
    sent = [r.getMessage() for r in caplog.records
            if r.name == "paho.mqtt" and r.getMessage().startswith("Sending ")]
    subscribe = next(i for i, line in enumerate(sent) if line.startswith("Sending SUBSCRIBE"))
    online = next(i for i, line in enumerate(sent)
                  if line.startswith("Sending PUBLISH") and presence in line)
    assert subscribe < online, sent


def test_backoff_is_jittered_and_capped() -> None:
    delays = [backoff_delay(10, 0.5, 30.0) for _ in range(200)]
    assert max(delays) <= 30.0 and min(delays) >= 0.5
    assert len({round(d, 3) for d in delays}) > 100  # jitter, not lockstep
    assert all(backoff_delay(0, 0.5, 30.0) <= 0.5 for _ in range(20))


async def test_a_burst_of_messages_leaves_the_event_loop_free_between_turns() -> None:
    """A broker may send a resumed session's whole backlog at once, past the Receive
    Maximum (Mosquitto 2.0 does): what paho's thread received while the loop was busy is
    handed on a few hundred messages per loop turn, in order, so timers, HTTP and the
    batch writer still run in between."""
    count = 3000
    transport = PahoTransport(_settings("burst"))
    received: list[bytes] = []
    done = asyncio.Event()

    def handler(message: InboundMessage) -> None:
        received.append(message.payload)
        if len(received) == count:
            done.set()

    transport.message_handler = handler
    transport._loop = asyncio.get_running_loop()  # as start() sets it; no connection
    for i in range(count):  # what paho's network thread calls for each PUBLISH
        message = mqtt.MQTTMessage(mid=i + 1, topic=b"org/o/device/d/status")
        message.payload, message.qos = b"%d" % i, 1
        transport._on_message(transport._client, None, message)
    turns = 0
    while not done.is_set():  # each pass is one turn of the loop
        turns += 1
        await asyncio.sleep(0)
    assert received == [b"%d" % i for i in range(count)]
    assert turns >= count // DELIVER_PER_TURN
