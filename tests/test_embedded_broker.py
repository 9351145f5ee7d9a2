"""What the embedded amqtt broker does for a paho-mqtt 2.x client speaking MQTT 3.1.1."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from bridge.embedded_broker import EmbeddedBroker
from bridge.errors import TransportError
from tests.support.procs import free_port

TIMEOUT = 5.0


class Client:
    """A paho client on its own network thread; received messages land in a queue."""

    def __init__(self, port: int, client_id: str, *, clean_session: bool = True,
                 protocol: MQTTProtocolVersion = mqtt.MQTTv311,
                 will: tuple[str, bytes, int, bool] | None = None) -> None:
        self.port = port
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack = threading.Event()
        self.reason: ReasonCode | None = None
        self.session_present = False
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
            clean_session=clean_session if protocol != mqtt.MQTTv5 else None)
        self.paho.on_connect = self._on_connect
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.suback = threading.Event()
        if will is not None:
            self.paho.will_set(*will)

    def _on_connect(self, _c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, _p: object) -> None:
        self.reason, self.session_present = reason, flags.session_present
        self.connack.set()

    def _on_subscribe(self, *_args: object) -> None:
        self.suback.set()

    def connect(self) -> Client:
        assert self.paho.connect("127.0.0.1", self.port, keepalive=10) == mqtt.MQTT_ERR_SUCCESS
        assert self.paho.loop_start() == mqtt.MQTT_ERR_SUCCESS
        assert self.connack.wait(TIMEOUT), "no CONNACK"
        return self

    def subscribe(self, topic_filter: str) -> None:
        self.suback.clear()
        rc, _mid = self.paho.subscribe(topic_filter, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        assert self.suback.wait(TIMEOUT), "no SUBACK"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1, returning once the broker's PUBACK arrived."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), "no PUBACK"

    def get(self, topic: str, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        """The next message on ``topic``, skipping others (amqtt leaks retained ones)."""
        while True:
            msg = self.messages.get(timeout=timeout)
            if msg.topic == topic:
                return msg

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()

    def drop(self) -> None:
        """An abrupt loss of the connection: no DISCONNECT packet is sent."""
        sock = self.paho.socket()
        assert sock is not None
        sock.close()
        self.paho.loop_stop()


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker("127.0.0.1", free_port()) as b:
        yield b


@contextmanager
def connected(port: int, client_id: str, **kw: object) -> Iterator[Client]:
    client = Client(port, client_id, **kw).connect()  # type: ignore[arg-type]
    try:
        yield client
    finally:
        client.close()


def test_url_selects_mqtt_311() -> None:
    assert EmbeddedBroker("127.0.0.1", 1884).url == "mqtt://127.0.0.1:1884?protocol=3.1.1"


async def test_qos1_round_trip_with_wildcard(broker: EmbeddedBroker, unique_id: str) -> None:
    def scenario() -> None:
        with connected(broker.port, f"sub-{unique_id}") as sub, \
                connected(broker.port, f"pub-{unique_id}") as pub:
            sub.subscribe("org/+/device/+/#")
            pub.publish(f"org/{unique_id}/device/R1/status", b"s1")
            pub.publish(f"org/{unique_id}/device/R1/callback/robotBinding", b"cb")
            pub.publish(f"org/{unique_id}/gateway/R1/status", b"no match")
            msg = sub.get(f"org/{unique_id}/device/R1/status")
            assert (msg.payload, msg.qos) == (b"s1", 1)
            assert sub.get(f"org/{unique_id}/device/R1/callback/robotBinding").payload == b"cb"
            with pytest.raises(queue.Empty):
                sub.get(f"org/{unique_id}/gateway/R1/status", timeout=1)

    await asyncio.to_thread(scenario)


async def test_retained_message_reaches_a_later_subscriber(broker: EmbeddedBroker,
                                                           unique_id: str) -> None:
    topic = f"org/{unique_id}/device/gw/presence"

    def scenario() -> None:
        with connected(broker.port, f"pub-{unique_id}") as pub:
            pub.publish(topic, b"online", retain=True)
        with connected(broker.port, f"late-{unique_id}") as late:
            late.subscribe(topic)
            msg = late.get(topic)
            assert (msg.payload, msg.retain) == (b"online", True)

    await asyncio.to_thread(scenario)


async def test_last_will_on_abrupt_disconnect_only(broker: EmbeddedBroker,
                                                   unique_id: str) -> None:
    topic = f"org/{unique_id}/device/gw/presence"
    will = (topic, b"offline", 1, True)

    def scenario() -> None:
        with connected(broker.port, f"watch-{unique_id}") as watcher:
            watcher.subscribe(topic)
            polite = Client(broker.port, f"polite-{unique_id}", will=will).connect()
            polite.close()  # a clean DISCONNECT discards the will
            gateway = Client(broker.port, f"gw-{unique_id}", will=will).connect()
            gateway.drop()
            msg = watcher.get(topic)
            assert msg.payload == b"offline"
            with pytest.raises(queue.Empty):
                watcher.get(topic, timeout=1)  # exactly one will: the polite client's never came
        with connected(broker.port, f"late-{unique_id}") as late:
            late.subscribe(topic)
            assert late.get(topic).payload == b"offline"  # the will was retained

    await asyncio.to_thread(scenario)


async def test_persistent_session_queues_qos1_while_offline(broker: EmbeddedBroker,
                                                            unique_id: str) -> None:
    topic = f"org/{unique_id}/device/R1/event"

    def scenario() -> None:
        consumer = Client(broker.port, f"cb-{unique_id}", clean_session=False).connect()
        assert not consumer.session_present
        consumer.subscribe(f"org/{unique_id}/device/+/event")
        consumer.close()
        with connected(broker.port, f"pub-{unique_id}") as pub:
            for i in range(3):
                pub.publish(topic, f"e{i}".encode())
        with connected(broker.port, f"cb-{unique_id}", clean_session=False) as back:
            assert back.session_present
            assert [back.get(topic).payload for _ in range(3)] == [b"e0", b"e1", b"e2"]

    await asyncio.to_thread(scenario)


async def test_mqtt5_is_refused(broker: EmbeddedBroker, unique_id: str) -> None:
    def scenario() -> None:
        client = Client(broker.port, f"v5-{unique_id}", protocol=mqtt.MQTTv5)
        try:
            client.connect()
            assert client.reason is not None and client.reason.is_failure
            assert client.reason.getName() == "Unsupported protocol version"
        finally:
            client.paho.loop_stop()

    await asyncio.to_thread(scenario)


async def test_port_in_use_is_a_transport_error(broker: EmbeddedBroker) -> None:
    with pytest.raises(TransportError, match="could not listen"):
        async with EmbeddedBroker("127.0.0.1", broker.port):
            pass
