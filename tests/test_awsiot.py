"""The AWS IoT backend (real awscrt / awsiotsdk) against a Mosquitto requiring client
certificates, the closest this machine gets to AWS IoT Core."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest

from bridge.errors import PayloadTooLargeError, PublishRefusedError, TopicNotAllowedError
from bridge.transport import InboundMessage, MqttSettings, TlsFiles, create_transport
from bridge.transport.awsiot import AwsIotTransport
from tests.support.mqtt_probe import Probe, publish_once
from tests.support.services import callback_server, edge_agent
from tests.support.tls_certs import CertPair, Pki, TlsBroker
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


def settings(broker: TlsBroker, pki: Pki, client_id: str = "", *,
             pair: CertPair | None = None, **overrides: object) -> MqttSettings:
    pair = pair or pki.client
    return MqttSettings.from_url(
        broker.tls_url, client_id=client_id or f"aws-{uuid.uuid4().hex[:8]}",
        tls_files=TlsFiles(str(pki.trusted.cert), str(pair.cert), str(pair.key)),
        backoff_min=0.1, backoff_max=1.0, **overrides)


async def test_publish_is_acked_and_subscriptions_deliver(
        tls_broker: TlsBroker, pki: Pki) -> None:
    topic = f"org/acme/device/{uuid.uuid4().hex[:8]}/status"
    transport = create_transport("awsiot", settings(tls_broker, pki, clean_start=True))
    assert isinstance(transport, AwsIotTransport) and transport.max_qos == 1
    got: asyncio.Queue[InboundMessage] = asyncio.Queue()
    transport.message_handler = got.put_nowait
    with Probe(tls_broker.plain_url, topic) as probe:
        async with transport:
            await asyncio.wait_for(transport.wait_connected(), 10)
            await transport.subscribe(topic, qos=1)
            await asyncio.wait_for(asyncio.gather(
                *(transport.publish(topic, b"%d" % i, qos=1) for i in range(50))), 10)
            echoed = [(await asyncio.wait_for(got.get(), 10)).payload for _ in range(50)]
        seen = await asyncio.to_thread(probe.wait_for, 50)
    assert echoed == [b"%d" % i for i in range(50)]  # in order on one connection
    assert [m.payload for m in seen] == echoed


async def test_awscrt_itself_keeps_a_connection_under_aws_iots_100_publishes_a_second(
        tls_broker: TlsBroker, pki: Pki) -> None:
    """Behind the publisher's own pacing, awscrt's (AWS_IOT_CORE_DEFAULTS): whatever
    publishes through this transport never trips AWS's throttling."""
    transport = create_transport("awsiot", settings(tls_broker, pki, clean_start=True))
    async with transport:
        await asyncio.wait_for(transport.wait_connected(), 10)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(asyncio.gather(
            *(transport.publish(f"paced/{i}", b"x", qos=1) for i in range(250))), 20)
        elapsed = loop.time() - started
    assert elapsed >= 1.4  # 250 at 100/s, whatever burst the bucket starts with


async def test_a_withheld_ack_is_redelivered_to_the_rejoined_session(
        tls_broker: TlsBroker, pki: Pki) -> None:
    topic = f"test/{uuid.uuid4().hex[:8]}/held"
    client_id = f"aws-held-{uuid.uuid4().hex[:8]}"
    first: asyncio.Queue[InboundMessage] = asyncio.Queue()
    sub = create_transport("awsiot", settings(tls_broker, pki, client_id, manual_ack=True))
    sub.message_handler = first.put_nowait
    async with sub:
        await asyncio.wait_for(sub.wait_connected(), 10)
        await sub.subscribe(topic, qos=1)
        async with create_transport("awsiot", settings(tls_broker, pki, clean_start=True)) as pub:
            await asyncio.wait_for(pub.wait_connected(), 10)
            await pub.publish(topic, b"hold-me", qos=1)
        assert (await asyncio.wait_for(first.get(), 10)).payload == b"hold-me"
        # leave without acking
    again: asyncio.Queue[InboundMessage] = asyncio.Queue()
    sub = create_transport("awsiot", settings(tls_broker, pki, client_id, manual_ack=True))
    sub.message_handler = again.put_nowait
    async with sub:
        msg = await asyncio.wait_for(again.get(), 10)
        assert msg.payload == b"hold-me"
        sub.ack(msg)
        await sub.unsubscribe(topic)
    async with create_transport("awsiot", settings(tls_broker, pki, client_id,
                                                   clean_start=True)) as cleanup:
        await asyncio.wait_for(cleanup.wait_connected(), 10)


async def test_aws_iot_limits_are_refused_before_sending(
        tls_broker: TlsBroker, pki: Pki) -> None:
    transport = create_transport("awsiot", settings(tls_broker, pki, clean_start=True))
    async with transport:
        await asyncio.wait_for(transport.wait_connected(), 10)
        cases = {
            "org/acme/device/x/status": b"x" * (128 * 1024 + 1),  # payload over 128 KiB
            "a/b/c/d/e/f/g/h/i": b"{}",                          # 8 slashes
            "$aws/things/x/shadow/update": b"{}",                # reserved
            "t/" + "x" * 300: b"{}",                             # over 256 bytes
        }
        for topic, payload in cases.items():
            with pytest.raises(PublishRefusedError) as refused:
                await transport.publish(topic, payload, qos=1)
            assert refused.value.permanent, topic  # the outbox sets it aside, no resend loop
        with pytest.raises(PayloadTooLargeError):  # what the REST proxy turns into a 413
            transport.check_publish("org/a/device/b/status", b"x" * 200_000, 1)
        with pytest.raises(TopicNotAllowedError):
            transport.check_publish("$aws/rules/x", b"{}", 1)
        assert transport.connected  # nothing reached AWS, so nothing got us disconnected


async def test_an_untrusted_certificate_never_connects(tls_broker: TlsBroker, pki: Pki,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    transport = create_transport("awsiot", settings(tls_broker, pki, pair=pki.rogue_client))
    async with transport:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(transport.wait_connected(), 2)
    assert "AWS IoT connection to 127.0.0.1" in caplog.text


def test_edge_agent_on_the_aws_backend_end_to_end(
        tmp_path: Path, tls_broker: TlsBroker, pki: Pki) -> None:
    """Webhook in, envelope out, retained online, last will offline after SIGKILL."""
    env = {"MQTT_BACKEND": "awsiot", "MQTT_CA_FILE": str(pki.trusted.cert),
           "MQTT_CERT_FILE": str(pki.client.cert), "MQTT_KEY_FILE": str(pki.client.key)}
    gateway = f"gw-{uuid.uuid4().hex[:6]}"
    body = {"callback_type": "robotStatus",
            "data": {"sn": "AWS1", "run_status": "ONLINE", "timestamp": 1_700_000_000}}
    with Probe(tls_broker.plain_url, f"org/acme/device/{gateway}/presence") as presence, \
            Probe(tls_broker.plain_url, "org/acme/device/AWS1/status") as status:
        agent = edge_agent(tmp_path, tls_broker.tls_url, org="acme", gateway=gateway,
                           **env).start()
        try:
            assert presence.wait_for(1)[-1].payload == b"online"
            r = httpx.post(agent.url + "/api/pudu/webhook", json=body,
                           headers={"CallbackCode": "test-code"})
            assert r.status_code == 200, r.text
            envelope = json.loads(status.wait_for(1)[0].payload)
            assert (envelope["device"], envelope["gateway"]) == ("AWS1", gateway)
        finally:
            agent.kill()
        assert presence.wait_for(2)[-1].payload == b"offline"


def test_callback_server_on_the_aws_backend_stores_what_it_consumes(
        tmp_path: Path, tls_broker: TlsBroker, pki: Pki) -> None:
    env = {"MQTT_BACKEND": "awsiot", "MQTT_CA_FILE": str(pki.trusted.cert),
           "MQTT_CERT_FILE": str(pki.client.cert), "MQTT_KEY_FILE": str(pki.client.key),
           "SHARE_GROUP": "ingest"}
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    prefix = f"t{uuid.uuid4().hex[:6]}/"
    envelope = {"v": 1, "id": "aws-m1", "type": "notifyRobotPower", "org": "acme",
                "device": "AWS2", "gateway": "gw", "ts": 1_700_000_000.0,
                "received_at": 1_700_000_001.0, "data": {"battery_level": 77},
                "raw": {}, "channel": "power"}
    with callback_server(tmp_path, tls_broker.tls_url, db, TOPIC_PREFIX=prefix, **env) as cs:
        cs.wait_health("subscribed", True)
        publish_once(tls_broker.plain_url, f"{prefix}org/acme/device/AWS2/power",
                     json.dumps(envelope))
        robot = eventually(lambda: httpx.get(cs.url + "/robots/AWS2", headers=cs.auth),
                           accept=lambda r: r.status_code != 404, within=15, what="AWS2 stored")
        assert robot.json()["battery_level"] == 77
        assert cs.health()["stored"] == 1  # acked only after the commit (manual puback)

