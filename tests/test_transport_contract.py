"""One contract over every transport: memory (in process), paho and crt (the shared
Mosquitto), and awsiot and paho-tls (awscrt and paho against a Mosquitto that requires
client certificates). What the
product relies on from a broker: async QoS 1 acks, order, wildcard and shared routing,
retained messages, persistent sessions that redeliver what was not acknowledged."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest

from bridge.errors import PublishRefusedError
from bridge.transport import (
    InboundMessage,
    MqttSettings,
    TlsFiles,
    Transport,
    Will,
    create_transport,
)

Make = Callable[..., Transport]
BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("paho", id="paho", marks=pytest.mark.integration),
    pytest.param("crt", id="crt", marks=pytest.mark.integration),
    pytest.param("awsiot", id="awsiot", marks=pytest.mark.integration),
    pytest.param("paho-tls", id="paho-tls", marks=pytest.mark.integration),
]


@pytest.fixture(params=BACKENDS)
def make(request: pytest.FixtureRequest) -> Make:
    backend: str = request.param
    broker = f"memory-{uuid.uuid4().hex[:8]}"  # one in-process broker per test

    def build(client_id: str = "", **overrides: object) -> Transport:
        client_id = client_id or f"c-{uuid.uuid4().hex[:10]}"
        extra: dict[str, object] = {}
        if backend == "memory":
            url = f"mqtt://{broker}"
        elif backend in ("paho", "crt"):
            url = "mqtt://127.0.0.1:1883"
        else:  # awsiot, paho-tls: mutual TLS
            tls_broker, pki = request.getfixturevalue("tls_broker"), \
                request.getfixturevalue("pki")
            url = tls_broker.tls_url
            extra = {"tls_files": TlsFiles(str(pki.trusted.cert), str(pki.client.cert),
                                           str(pki.client.key))}
        settings = MqttSettings.from_url(url, client_id=client_id, backoff_min=0.1,
                                         backoff_max=1.0, **{**extra, **overrides})
        return create_transport(backend.removesuffix("-tls"), settings)

    return build


class Inbox:
    """What a transport delivered, awaited message by message."""

    def __init__(self, transport: Transport) -> None:
        self.queue: asyncio.Queue[InboundMessage] = asyncio.Queue()
        transport.message_handler = self.queue.put_nowait

    async def take(self, n: int) -> list[InboundMessage]:
        return [await asyncio.wait_for(self.queue.get(), 10) for _ in range(n)]


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


async def started(stack: AsyncExitStack, transport: Transport) -> Transport:
    await stack.enter_async_context(transport)
    await asyncio.wait_for(transport.wait_connected(), 10)
    return transport


def base() -> str:
    return f"contract/{uuid.uuid4().hex[:10]}"


async def test_qos1_acks_arrive_asynchronously_and_order_is_kept(
        make: Make, stack: AsyncExitStack) -> None:
    topic = base() + "/a"
    sub = await started(stack, make(clean_start=True))
    inbox = Inbox(sub)
    await sub.subscribe(topic, qos=1)
    pub = await started(stack, make(clean_start=True))
    futures = [pub.publish(topic, b"%d" % i, qos=1) for i in range(30)]
    assert not futures[0].done()  # never acked inline: a PUBACK comes later
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert [m.payload for m in await inbox.take(30)] == [b"%d" % i for i in range(30)]


async def test_a_burst_of_any_sizes_arrives_whole_and_in_order(
        make: Make, stack: AsyncExitStack) -> None:
    """Sizes around MQTT's length-byte steps and a transport's reads (paho's are 64 KiB),
    up to near AWS IoT Core's 128 KiB, many in flight at once."""
    rng = random.Random(31)
    sizes = [0, 1, 127, 128, 16_383, 16_384, 65_535, 65_536, 65_537, 120_000]
    sizes += [rng.randrange(2_000) if rng.random() < 0.8 else rng.randrange(120_000)
              for _ in range(190)]
    payloads = [rng.randbytes(size) for size in sizes]
    topic = base() + "/sizes"
    sub = await started(stack, make(clean_start=True))
    inbox = Inbox(sub)
    await sub.subscribe(topic, qos=1)
    pub = await started(stack, make(clean_start=True))
    await asyncio.wait_for(asyncio.gather(*(pub.publish(topic, p, qos=1) for p in payloads)),
                           30)
    received = [m.payload for m in await inbox.take(len(payloads))]
    assert [len(p) for p in received] == sizes
    assert received == payloads


async def test_wildcards_route_and_retained_messages_reach_late_subscribers(
        make: Make, stack: AsyncExitStack) -> None:
    b = base()
    pub = await started(stack, make(clean_start=True))
    await pub.publish(f"{b}/r/state", b"kept", qos=1, retain=True)
    sub = await started(stack, make(clean_start=True))
    inbox = Inbox(sub)
    await sub.subscribe(f"{b}/+/state", qos=1)
    first = (await inbox.take(1))[0]
    assert (first.payload, first.retain) == (b"kept", True)
    await pub.publish(f"{b}/x/state", b"one", qos=1)
    await pub.publish(f"{b}/x/other", b"not this", qos=1)
    await pub.publish(f"{b}/y/state", b"two", qos=1)
    assert [m.payload for m in await inbox.take(2)] == [b"one", b"two"]
    await pub.publish(f"{b}/r/state", b"", qos=1, retain=True)  # clears the retained one


async def test_a_shared_subscription_delivers_each_message_once(
        make: Make, stack: AsyncExitStack) -> None:
    b = base()
    group = f"g{uuid.uuid4().hex[:6]}"
    members = [await started(stack, make(clean_start=True)) for _ in range(2)]
    inboxes = [Inbox(m) for m in members]
    for member in members:
        await member.subscribe(f"$share/{group}/{b}/#", qos=1)
    pub = await started(stack, make(clean_start=True))
    await asyncio.wait_for(asyncio.gather(
        *(pub.publish(f"{b}/m", b"%d" % i, qos=1) for i in range(40))), 10)
    got: list[bytes] = []
    while len(got) < 40:
        done, _ = await asyncio.wait([asyncio.ensure_future(i.queue.get()) for i in inboxes],
                                     timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert done, f"only {len(got)} of 40 delivered"
        for task in done:
            got.append(task.result().payload)
        for task in _:
            task.cancel()
    assert sorted(got) == sorted(b"%d" % i for i in range(40))  # each exactly once


@pytest.mark.parametrize("bad", ["\n", "\t", "\x7f", "\x8f", "\ufffe", "\U0001ffff", "+"])
async def test_a_topic_brokers_refuse_fails_for_good_and_the_connection_stays(
        make: Make, stack: AsyncExitStack, bad: str) -> None:
    # Mosquitto answers such a publish by disconnecting ("malformed packet"); resent after
    # the reconnect it would disconnect again, for ever. Refused before sending instead:
    # permanently (the outbox sets it aside), and what follows still goes out.
    topic = base() + "/ok"
    sub = await started(stack, make(clean_start=True))
    inbox = Inbox(sub)
    await sub.subscribe(topic, qos=1)
    pub = await started(stack, make(clean_start=True))
    with pytest.raises(PublishRefusedError) as refused:
        await asyncio.wait_for(pub.publish(base() + f"/a{bad}b", b"x", qos=1), 10)
    assert refused.value.permanent
    await asyncio.wait_for(pub.publish(topic, b"after", qos=1), 10)
    assert [m.payload for m in await inbox.take(1)] == [b"after"]
    assert pub.connected


async def test_a_persistent_session_redelivers_what_was_not_acked(make: Make) -> None:
    topic = base() + "/held"
    client_id = f"held-{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        sub = await started(stack, make(client_id, manual_ack=True))
        inbox = Inbox(sub)
        await sub.subscribe(topic, qos=1)
        pub = await started(stack, make(clean_start=True))
        await pub.publish(topic, b"hold-me", qos=1)
        assert (await inbox.take(1))[0].payload == b"hold-me"  # and never acked
    async with AsyncExitStack() as stack:
        again = make(client_id, manual_ack=True)
        inbox = Inbox(again)
        await started(stack, again)
        message = (await inbox.take(1))[0]
        assert message.payload == b"hold-me"
        again.ack(message)
        await again.unsubscribe(topic)
    async with make(client_id, clean_start=True) as cleanup:  # leave no session behind
        await asyncio.wait_for(cleanup.wait_connected(), 10)


async def test_subscriptions_asked_before_start_are_in_place_when_birth_is_seen(
        make: Make, stack: AsyncExitStack) -> None:
    """A gateway subscribes to its commands before connecting and says "online" once
    connected: whoever answers that at once (a cloud with a command) must reach it."""
    topic = base()
    watcher = await started(stack, make(clean_start=True))
    births = Inbox(watcher)
    await watcher.subscribe(topic + "/presence", qos=1)
    gateway = make(clean_start=True, birth=Will(topic + "/presence", b"online", qos=1))
    commands = Inbox(gateway)
    await gateway.subscribe(topic + "/command", qos=1)  # before start: goes out on connect
    await started(stack, gateway)
    assert [m.payload for m in await births.take(1)] == [b"online"]
    await watcher.publish(topic + "/command", b"ping", qos=1)
    assert [m.payload for m in await commands.take(1)] == [b"ping"]


# -- what only the in-process broker lets a test do to it ------------------------------------
async def test_memory_broker_refusals_outages_and_last_will() -> None:
    from bridge.transport.memory import MemoryBroker

    name = f"mem-{uuid.uuid4().hex[:8]}"
    broker, url = MemoryBroker.named(name), f"mqtt://{name}"

    def make(client_id: str, **overrides: object) -> Transport:
        return create_transport("memory", MqttSettings.from_url(url, client_id=client_id,
                                                                **overrides))

    async with AsyncExitStack() as stack:
        watcher = await started(stack, make("watcher", clean_start=True))
        inbox = Inbox(watcher)
        await watcher.subscribe("gw/#", qos=1)
        gw = await started(stack, make("gw", will=Will("gw/presence", b"offline")))
        broker.refuse = lambda topic, payload: 0x87 if topic.startswith("gw/secret") else None
        with pytest.raises(PublishRefusedError) as info:
            await gw.publish("gw/secret", b"x", qos=1)
        assert info.value.permanent and info.value.code == 0x87
        broker.stop()  # the broker goes away: QoS 1 waits in the client
        waiting = gw.publish("gw/data", b"during outage", qos=1)
        await asyncio.sleep(0)
        assert not waiting.done() and not gw.connected
        broker.start()
        await asyncio.wait_for(waiting, 5)
        assert (await inbox.take(1))[0].payload == b"during outage"
        broker.crash_client("gw")
        assert (await inbox.take(1))[0].payload == b"offline"  # the last will
