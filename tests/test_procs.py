"""The process fixtures work: a private Mosquitto round-trips QoS 1 and restarts on its port."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.procs import MosquittoProcess, free_port, port_open, wait_for_port

TIMEOUT = 5.0


def connect(port: int, client_id: str, *, clean: bool = True,
            inbox: queue.Queue[mqtt.MQTTMessage] | None = None) -> tuple[mqtt.Client, bool]:
    """A connected MQTT 3.1.1 client on its own thread, and the CONNACK's session-present."""
    connack = threading.Event()
    present: list[bool] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                         protocol=mqtt.MQTTv311)

    def on_connect(_c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags,
                   reason: object, _p: object) -> None:
        present.append(flags.session_present)
        connack.set()

    client.on_connect = on_connect
    if inbox is not None:
        client.on_message = lambda _c, _u, msg: inbox.put(msg)
    assert client.connect("127.0.0.1", port, keepalive=10) == mqtt.MQTT_ERR_SUCCESS
    assert client.loop_start() == mqtt.MQTT_ERR_SUCCESS
    assert connack.wait(TIMEOUT), "no CONNACK"
    return client, present[0]


def subscribe(client: mqtt.Client, topic: str) -> None:
    acked = threading.Event()
    client.on_subscribe = lambda *_a: acked.set()
    rc, _mid = client.subscribe(topic, qos=1)
    assert rc == mqtt.MQTT_ERR_SUCCESS
    assert acked.wait(TIMEOUT), "no SUBACK"


def publish(client: mqtt.Client, topic: str, payload: bytes) -> None:
    info = client.publish(topic, payload, qos=1)
    assert info.rc == mqtt.MQTT_ERR_SUCCESS
    info.wait_for_publish(TIMEOUT)
    assert info.is_published(), "no PUBACK"


def close(*clients: mqtt.Client) -> None:
    for client in clients:
        client.disconnect()
        client.loop_stop()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert not port_open("127.0.0.1", port)
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", port, timeout=0.1)


def test_free_port_never_hands_out_a_port_twice() -> None:
    # 500 draws from ~28,000 ephemeral ports: the kernel alone repeats one with
    # probability ~99 %, and two services given one port cannot both start.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_private_broker_round_trip_kill_and_restart(mosquitto: MosquittoProcess,
                                                    unique_id: str) -> None:
    topic = f"test/{unique_id}/qos1"
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    sub, _ = connect(mosquitto.port, f"sub-{unique_id}", clean=False, inbox=inbox)
    subscribe(sub, topic)
    pub, _ = connect(mosquitto.port, f"pub-{unique_id}")
    publish(pub, topic, b"before")
    msg = inbox.get(timeout=TIMEOUT)
    assert (msg.topic, msg.payload, msg.qos) == (topic, b"before", 1)
    close(sub, pub)

    pid, port = mosquitto.pid, mosquitto.port
    mosquitto.kill()
    assert not mosquitto.running
    assert not port_open("127.0.0.1", port)

    mosquitto.start()
    assert (mosquitto.port, mosquitto.url) == (port, f"mqtt://127.0.0.1:{port}")
    assert mosquitto.pid != pid
    inbox = queue.Queue()
    # a clean session: whether the old one survived SIGKILL depends on autosave timing
    sub, _ = connect(mosquitto.port, f"sub-{unique_id}", inbox=inbox)
    subscribe(sub, topic)
    pub, _ = connect(mosquitto.port, f"pub-{unique_id}")
    publish(pub, topic, b"after")
    assert inbox.get(timeout=TIMEOUT).payload == b"after"
    close(sub, pub)


def test_graceful_stop_keeps_queued_messages(mosquitto: MosquittoProcess,
                                             unique_id: str) -> None:
    topic = f"test/{unique_id}/queued"
    sub, _ = connect(mosquitto.port, f"sub-{unique_id}", clean=False)
    subscribe(sub, topic)
    close(sub)
    pub, _ = connect(mosquitto.port, f"pub-{unique_id}")
    publish(pub, topic, b"kept")
    close(pub)
    mosquitto.stop()  # SIGTERM: mosquitto writes its persistence file on the way out
    mosquitto.start()
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    sub, present = connect(mosquitto.port, f"sub-{unique_id}", clean=False, inbox=inbox)
    assert present
    assert inbox.get(timeout=TIMEOUT).payload == b"kept"
    close(sub)


def test_extra_config_lines_and_own_directory(unique_id: str) -> None:
    with MosquittoProcess(persistence=False, extra=["max_packet_size 1000"]) as broker:
        assert "max_packet_size 1000" in broker.conf.read_text()
        client, _ = connect(broker.port, f"c-{unique_id}")
        close(client)
        base = broker.base
    assert not broker.running
    assert not base.exists()


def test_a_broken_config_fails_with_mosquittos_words(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path, extra="no_such_option 1")
    with pytest.raises(RuntimeError, match="exited"):
        broker.start()


@pytest.mark.integration
def test_shared_components_are_reachable(shared_broker_url: str, mariadb_url: str) -> None:
    assert shared_broker_url == "mqtt://127.0.0.1:1883"
    assert mariadb_url == "mysql://root:@127.0.0.1:3306/test"
    client, _ = connect(1883, "procs-shared-check")
    close(client)
