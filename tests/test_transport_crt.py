"""MQTT_BACKEND=crt: awscrt's client against Mosquittos that ask for what a site's broker
asks for (a login, a CA of its own, client certificates), beside the contract suite's
plain one. What a user would notice: it connects where it should, never where it should
not, and says so; a publish no broker can take fails at once."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from bridge.errors import PublishRefusedError
from bridge.transport import InboundMessage, MqttSettings, TlsFiles, Transport, create_transport
from tests.support.procs import MosquittoProcess
from tests.support.tls_certs import Pki, TlsBroker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def login_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """A Mosquitto that takes only user ``site`` with password ``s3cret``."""
    base = tmp_path_factory.mktemp("login-broker")
    passwords = base / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "site", "s3cret"],
                   check=True, capture_output=True)
    passwords.chmod(0o600)
    proc = MosquittoProcess(base, extra=["allow_anonymous false",
                                         f"password_file {passwords}"]).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def crt() -> AsyncIterator[list[Transport]]:
    """Builds crt transports and stops every one at the end of the test."""
    made: list[Transport] = []
    yield made
    for transport in made:
        await transport.stop()


async def start(made: list[Transport], url: str, **overrides: object) -> Transport:
    settings = MqttSettings.from_url(url, client_id=f"crt-{uuid.uuid4().hex[:8]}",
                                     clean_start=True, backoff_min=0.1, backoff_max=0.5,
                                     **overrides)
    transport = create_transport("crt", settings)
    made.append(transport)
    await transport.start()
    return transport


async def round_trip(sub: Transport, pub: Transport) -> InboundMessage:
    topic = f"crt/{uuid.uuid4().hex[:8]}"
    got: asyncio.Queue[InboundMessage] = asyncio.Queue()
    sub.message_handler = got.put_nowait
    await sub.subscribe(topic, qos=1)
    await asyncio.wait_for(pub.publish(topic, b"hello", qos=1), 10)
    return await asyncio.wait_for(got.get(), 10)


async def test_a_login_broker_takes_the_right_password_and_never_a_wrong_one(
        login_broker: MosquittoProcess, crt: list[Transport],
        caplog: pytest.LogCaptureFixture) -> None:
    good = f"mqtt://site:s3cret@127.0.0.1:{login_broker.port}"
    sub, pub = await start(crt, good), await start(crt, good)
    await asyncio.wait_for(asyncio.gather(sub.wait_connected(), pub.wait_connected()), 10)
    assert (await round_trip(sub, pub)).payload == b"hello"

    caplog.set_level(logging.WARNING, "bridge.transport.crt")
    wrong = await start(crt, f"mqtt://site:guess@127.0.0.1:{login_broker.port}")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(wrong.wait_connected(), 1.5)
    assert "connection to 127.0.0.1" in caplog.text  # the refusal is logged, not silent


async def test_mutual_tls_connects_with_the_sites_ca_and_refuses_an_unknown_broker(
        tls_broker: TlsBroker, pki: Pki, crt: list[Transport]) -> None:
    trusted = TlsFiles(str(pki.trusted.cert), str(pki.client.cert), str(pki.client.key))
    sub = await start(crt, tls_broker.tls_url, tls_files=trusted)
    pub = await start(crt, tls_broker.plain_url)
    await asyncio.wait_for(asyncio.gather(sub.wait_connected(), pub.wait_connected()), 10)
    assert (await round_trip(sub, pub)).payload == b"hello"

    # the broker's certificate is not signed by the CA we were given
    wary = TlsFiles(str(pki.rogue.cert), str(pki.client.cert), str(pki.client.key))
    refused = await start(crt, tls_broker.tls_url, tls_files=wary)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(refused.wait_connected(), 1.5)


async def test_qos_2_is_refused_at_once_and_stopping_is_not_a_warning(
        shared_broker_url: str, crt: list[Transport],
        caplog: pytest.LogCaptureFixture) -> None:
    transport = await start(crt, shared_broker_url)
    await asyncio.wait_for(transport.wait_connected(), 10)
    assert transport.max_qos == 1
    with pytest.raises(PublishRefusedError, match="QoS 0 and 1"):
        await asyncio.wait_for(transport.publish("crt/q2", b"x", qos=2), 1)
    caplog.set_level(logging.INFO, "bridge.transport.crt")
    await transport.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_stream_consumer_shortens_the_gil_switch_interval_and_a_publisher_does_not(
        shared_broker_url: str, crt: list[Transport]) -> None:
    """awscrt's threads take the GIL per message: at Python's 5 ms a busy consumer's
    deliveries queue behind it (docs/benchmarks.md: 1,200 stored/s against 3,850)."""
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        await start(crt, shared_broker_url)
        assert sys.getswitchinterval() == 0.005
        await start(crt, shared_broker_url, manual_ack=True)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)
