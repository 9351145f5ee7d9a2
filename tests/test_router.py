"""MessageRouter: dispatch by MQTT filter, manual acks, refcounted broker subscriptions."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from bridge.errors import TransportError
from bridge.router import MessageRouter
from bridge.transport import InboundMessage, MqttSettings, Transport
from bridge.transport.paho import PahoTransport

BROKER = "mqtt://127.0.0.1:1883"


class FakeTransport(Transport):
    """Records broker calls; ``gate`` holds SUBSCRIBEs open, ``refuse`` makes them fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, int]] = []
        self.acked: list[InboundMessage] = []
        self.gate: asyncio.Event | None = None
        self.refuse = False
        self.unsubscribed = asyncio.Event()
        self.entered = asyncio.Event()

    @property
    def max_qos(self) -> int:
        return 2

    async def start(self) -> None:
        self._notify_connection(True)

    async def stop(self) -> None:
        self._notify_connection(False)

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.calls.append(("sub", topic_filter, qos))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse:
            raise TransportError("refused")

    async def unsubscribe(self, topic_filter: str) -> None:
        self.calls.append(("unsub", topic_filter, 0))
        self.unsubscribed.set()

    def ack(self, message: InboundMessage) -> None:
        self.acked.append(message)

    def deliver(self, topic: str, payload: bytes = b"", qos: int = 1) -> InboundMessage:
        message = InboundMessage(topic=topic, payload=payload, qos=qos, mid=1)
        assert self.message_handler is not None
        self.message_handler(message)
        return message


def _collector(router: MessageRouter, flt: str, seen: dict[str, list[str]]) -> None:
    seen[flt] = []
    router.add(flt, lambda m: seen[flt].append(m.topic))


def test_router_installs_itself_as_the_transport_handler() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    assert transport.message_handler == router._dispatch


def test_wildcards_and_dollar_topics() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    seen: dict[str, list[str]] = {}
    for flt in ("#", "a/+/c", "a/#", "+/b/+", "$SYS/#", "a/b"):
        _collector(router, flt, seen)
    fallback: list[str] = []
    router.fallback = lambda m: fallback.append(m.topic)

    transport.deliver("a/b/c")
    transport.deliver("a")
    transport.deliver("$SYS/broker/load")
    transport.deliver("$aws/things/x")

    assert seen["#"] == ["a/b/c", "a"]
    assert seen["a/+/c"] == ["a/b/c"]
    assert seen["a/#"] == ["a/b/c", "a"]  # '#' also matches the parent level
    assert seen["+/b/+"] == ["a/b/c"]
    assert seen["a/b"] == []
    # MQTT §4.7.2: wildcard-led filters never match $-topics; a literal $ filter does.
    assert seen["$SYS/#"] == ["$SYS/broker/load"]
    assert fallback == ["$aws/things/x"]
    assert router.unmatched == 1


def test_shared_filters_route_on_their_base() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    seen: dict[str, list[str]] = {}
    _collector(router, "$share/g1/org/+/device/+/status", seen)
    _collector(router, "$share/g2/#", seen)

    transport.deliver("org/o1/device/d1/status")
    transport.deliver("org/o1/device/d1/pose")
    transport.deliver("$SYS/x")

    assert seen["$share/g1/org/+/device/+/status"] == ["org/o1/device/d1/status"]
    assert seen["$share/g2/#"] == ["org/o1/device/d1/status", "org/o1/device/d1/pose"]


def test_remove_stops_delivery_and_is_idempotent() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    got: list[str] = []
    handle = router.add("x/#", lambda m: got.append(m.topic))
    transport.deliver("x/1")
    router.remove(handle)
    router.remove(handle)
    transport.deliver("x/2")
    assert got == ["x/1"]
    assert router.routes == 0


def test_invalid_filter_is_refused() -> None:
    router = MessageRouter(FakeTransport())
    with pytest.raises(Exception, match="must be the last level"):
        router.add("a/#/b", lambda m: None)


async def test_handler_errors_are_logged_and_do_not_stop_others(
        caplog: pytest.LogCaptureFixture) -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    done = asyncio.Event()

    def bad_sync(message: InboundMessage) -> None:
        raise ValueError("sync boom")

    async def bad_async(message: InboundMessage) -> None:
        raise RuntimeError("async boom")

    async def good_async(message: InboundMessage) -> None:
        done.set()

    router.add("t/#", bad_sync)
    router.add("t/#", bad_async)
    router.add("t/#", good_async)
    with caplog.at_level(logging.ERROR, logger="bridge.router"):
        transport.deliver("t/1")
        assert router.pending_tasks == 2  # async handlers run as kept tasks
        await asyncio.wait_for(done.wait(), 5)
        await router.aclose()  # waits for the kept tasks
    assert router.pending_tasks == 0
    assert router.handler_errors == 2
    text = caplog.text
    assert "sync boom" in text and "async boom" in text
    assert transport.message_handler is None


async def test_aclose_cancels_handlers_that_overrun() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport, drain_timeout=0.05)
    started = asyncio.Event()

    async def stuck(message: InboundMessage) -> None:
        started.set()
        await asyncio.Event().wait()

    router.add("t", stuck)
    transport.deliver("t")
    await asyncio.wait_for(started.wait(), 5)
    await router.aclose()
    assert router.pending_tasks == 0


def test_auto_routes_are_acked_at_once() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    router.add("a/#", lambda m: None)
    msg = transport.deliver("a/1")
    unmatched = transport.deliver("zzz")
    assert transport.acked == [msg, unmatched]


def test_manual_ack_waits_for_every_manual_route() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    inbox: list[InboundMessage] = []
    router.add("a/#", inbox.append, manual_ack=True)
    router.add("a/+", inbox.append, manual_ack=True)
    router.add("#", lambda m: None)  # auto route: does not ack for the manual ones
    msg = transport.deliver("a/1")
    assert inbox == [msg, msg]
    assert transport.acked == []
    assert router.unacked == 1
    router.ack(msg)
    assert transport.acked == []
    router.ack(msg)
    assert transport.acked == [msg]
    router.ack(msg)  # an extra ack is ignored, never a second PUBACK
    assert transport.acked == [msg]
    assert router.unacked == 0


def test_manual_handler_may_ack_synchronously() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    router.add("a", router.ack, manual_ack=True)
    msg = transport.deliver("a")
    assert transport.acked == [msg]


async def test_failing_manual_handler_leaves_message_unacked() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)

    async def fails(message: InboundMessage) -> None:
        raise RuntimeError("db down")

    router.add("a", fails, manual_ack=True)
    msg = transport.deliver("a")
    await router.aclose()
    assert transport.acked == []
    assert router.unacked == 0  # forgotten: the broker redelivers after reconnect
    router.ack(msg)
    assert transport.acked == []


async def test_subscribe_is_refcounted_per_exact_filter() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    await router.subscribe("a/#", 1)
    await router.subscribe("a/#", 1)
    await router.subscribe("a/+", 0)
    assert transport.calls == [("sub", "a/#", 1), ("sub", "a/+", 0)]
    assert router.filters() == {"a/#": 2, "a/+": 1}

    await router.subscribe("a/+", 1)  # higher QoS: SUBSCRIBE again replaces it (§3.8.4)
    assert transport.calls[-1] == ("sub", "a/+", 1)

    await router.unsubscribe("a/#")
    assert ("unsub", "a/#", 0) not in transport.calls
    await router.unsubscribe("a/#")
    assert transport.calls[-1] == ("unsub", "a/#", 0)
    assert router.filters() == {"a/+": 2}
    await router.unsubscribe("a/#")  # unknown now: logged, no broker traffic
    assert transport.calls.count(("unsub", "a/#", 0)) == 1


async def test_concurrent_first_subscribes_send_one_subscribe() -> None:
    transport = FakeTransport()
    transport.gate = asyncio.Event()
    router = MessageRouter(transport)
    first = asyncio.create_task(router.subscribe("c/#", 1))
    second = asyncio.create_task(router.subscribe("c/#", 1))
    await asyncio.wait_for(transport.entered.wait(), 5)  # first holds the SUBSCRIBE open
    transport.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert transport.calls == [("sub", "c/#", 1)]
    assert router.filters() == {"c/#": 2}


async def test_refused_subscribe_rolls_back() -> None:
    transport = FakeTransport()
    transport.refuse = True
    router = MessageRouter(transport)
    with pytest.raises(TransportError):
        await router.attach("r/#", lambda m: None)
    assert router.filters() == {}
    assert router.routes == 0
    # the transport would re-subscribe after a reconnect: the router clears that
    await asyncio.wait_for(transport.unsubscribed.wait(), 5)
    assert transport.calls == [("sub", "r/#", 1), ("unsub", "r/#", 0)]


async def test_attach_and_detach() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    got: list[str] = []
    h1 = await router.attach("d/#", lambda m: got.append("h1"))
    h2 = await router.attach("d/#", lambda m: got.append("h2"))
    transport.deliver("d/x")
    await router.detach(h1)
    await router.detach(h1)  # twice: no second release of the broker reference
    assert router.filters() == {"d/#": 1}
    transport.deliver("d/x")
    await router.detach(h2)
    assert router.filters() == {}
    assert got == ["h1", "h2", "h2"]
    assert transport.calls == [("sub", "d/#", 1), ("unsub", "d/#", 0)]


async def test_a_publication_reaches_each_route_once_whatever_its_copies() -> None:
    """A broker sends one copy per matching subscription (Mosquitto, AWS IoT Core): the
    second copy is acked and not dispatched again, so a proxy push or a command runs once."""
    transport = FakeTransport()
    router = MessageRouter(transport)
    got: dict[str, list[bytes]] = {"wide": [], "own": []}
    await router.attach("org/o/device/+/command", lambda m: got["wide"].append(m.payload))
    await router.attach("org/o/device/gw/command", lambda m: got["own"].append(m.payload))
    first = transport.deliver("org/o/device/gw/command", b"reboot")
    copy = transport.deliver("org/o/device/gw/command", b"reboot")
    assert got == {"wide": [b"reboot"], "own": [b"reboot"]}
    assert transport.acked == [first, copy] and router.copies == 1
    # Its copies in, the same payload again is a new publication; so is another topic's.
    transport.deliver("org/o/device/gw/command", b"reboot")
    transport.deliver("org/o/device/r1/command", b"reboot")
    transport.deliver("org/o/device/r1/command", b"reboot")  # one subscription matches r1
    assert got == {"wide": [b"reboot"] * 4, "own": [b"reboot"] * 2}


async def test_copies_are_told_by_payload_and_time_and_retained_ones_are_not() -> None:
    transport = FakeTransport()
    router = MessageRouter(transport)
    got: list[bytes] = []
    await router.attach("a/#", lambda m: got.append(m.payload))
    await router.subscribe("a/b", 1)  # a second subscription, no route of its own
    for payload in (b"1", b"1", b"2", b"2", b"1"):  # copies come together
        transport.deliver("a/b", payload)
    assert got == [b"1", b"2", b"1"] and router.copies == 2
    transport.deliver("a/b", b"3")
    transport.deliver("a/b", b"4")  # another payload between: 3 is not awaited any more
    transport.deliver("a/b", b"3")
    assert got[-3:] == [b"3", b"4", b"3"]
    retained = InboundMessage(topic="a/b", payload=b"5", qos=1, retain=True, mid=2)
    assert transport.message_handler is not None
    transport.message_handler(retained)  # sent for one new subscription: never a copy
    transport.message_handler(retained)
    assert got[-2:] == [b"5", b"5"]
    transport.deliver("a/b", b"6")
    router._awaited["a/b"].until -= 10  # the window has passed: a new publication
    transport.deliver("a/b", b"6")
    assert got[-2:] == [b"6", b"6"] and router.copies == 2


async def test_a_redelivery_or_a_copy_at_another_qos_is_dispatched_again() -> None:
    """At least once stands: a DUP resend, anything after a reconnect, and a QoS 1 copy
    after a QoS 0 one (the broker holds only the QoS 1 one for us) reach the routes."""
    transport = FakeTransport()
    router = MessageRouter(transport)
    got: list[tuple[bytes, int]] = []
    await router.attach("c/#", lambda m: got.append((m.payload, m.qos)), qos=0)
    await router.attach("c/gw", lambda m: got.append((m.payload, m.qos)))
    transport.deliver("c/gw", b"a", qos=0)
    transport.deliver("c/gw", b"a", qos=1)  # the copy for the QoS 1 subscription
    assert got == [(b"a", 0), (b"a", 0), (b"a", 1), (b"a", 1)]
    transport.deliver("c/gw", b"b")
    assert transport.message_handler is not None
    transport.message_handler(InboundMessage("c/gw", b"b", 1, mid=7, dup=True))
    transport.deliver("c/gw", b"c")
    transport._notify_connection(False)  # the connection dropped before the copy came
    transport._notify_connection(True)
    transport.deliver("c/gw", b"c")
    assert got[4:] == [(b"b", 1)] * 4 + [(b"c", 1)] * 4 and router.copies == 0


async def test_a_shared_subscription_is_not_counted_on_for_a_copy() -> None:
    """Replicas share the stream and each has its own presence subscription: the shared
    copy may go to another replica, so none is awaited, and a gateway going online,
    offline and online again within a second is seen three times."""
    transport = FakeTransport()
    router = MessageRouter(transport)
    got: list[bytes] = []
    router.add("org/+/device/+/#", lambda m: got.append(m.payload))
    await router.subscribe("$share/replicas/org/+/device/+/#", 1)
    await router.subscribe("org/+/device/+/presence", 1)
    for payload in (b"online", b"offline", b"online"):  # each, the non-shared copy only
        transport.deliver("org/o/device/gw/presence", payload)
    assert got == [b"online", b"offline", b"online"] and router.copies == 0


@pytest.mark.integration
async def test_overlapping_subscriptions_deliver_once_against_mosquitto() -> None:
    base = f"test/{uuid.uuid4().hex}"
    settings = [MqttSettings.from_url(BROKER, client_id=f"t-{role}-{uuid.uuid4().hex[:8]}",
                                      clean_start=True) for role in ("over", "opub")]
    async with PahoTransport(settings[0]) as sub, PahoTransport(settings[1]) as pub:
        router = MessageRouter(sub)
        await asyncio.wait_for(asyncio.gather(sub.wait_connected(), pub.wait_connected()), 5)
        got: dict[str, list[bytes]] = {"wide": [], "own": []}
        done = asyncio.Event()
        await router.attach(f"{base}/+/cmd", lambda m: got["wide"].append(m.payload))
        await router.attach(f"{base}/gw/cmd", lambda m: got["own"].append(m.payload))
        await router.attach(f"{base}/end", lambda m: done.set())
        for payload in (b"a", b"b"):
            await pub.publish(f"{base}/gw/cmd", payload, qos=1)
        await pub.publish(f"{base}/end", b"", qos=1)  # one connection: after every copy
        await asyncio.wait_for(done.wait(), 5)
        assert got == {"wide": [b"a", b"b"], "own": [b"a", b"b"]}
        assert router.copies == 2  # Mosquitto sent a copy per subscription


@pytest.mark.integration
async def test_refcounted_subscriptions_against_mosquitto() -> None:
    base = f"test/{uuid.uuid4().hex}"
    sub_settings = MqttSettings.from_url(BROKER, client_id=f"t-router-{uuid.uuid4().hex[:8]}",
                                         clean_start=True)
    pub_settings = MqttSettings.from_url(BROKER, client_id=f"t-rpub-{uuid.uuid4().hex[:8]}",
                                         clean_start=True)
    async with PahoTransport(sub_settings) as sub, PahoTransport(pub_settings) as pub:
        router = MessageRouter(sub)
        await asyncio.wait_for(asyncio.gather(sub.wait_connected(), pub.wait_connected()), 5)
        one: asyncio.Queue[str] = asyncio.Queue()
        two: asyncio.Queue[str] = asyncio.Queue()
        sentinel: asyncio.Queue[str] = asyncio.Queue()
        h1 = await router.attach(f"{base}/data/#", lambda m: one.put_nowait(m.topic))
        h2 = await router.attach(f"{base}/data/#", lambda m: two.put_nowait(m.topic))
        await router.attach(f"{base}/sentinel", lambda m: sentinel.put_nowait(m.topic))
        assert router.filters()[f"{base}/data/#"] == 2

        await pub.publish(f"{base}/data/1", b"1", qos=1)
        assert await asyncio.wait_for(one.get(), 5) == f"{base}/data/1"
        assert await asyncio.wait_for(two.get(), 5) == f"{base}/data/1"

        await router.detach(h1)  # still one holder: the broker keeps sending
        await pub.publish(f"{base}/data/2", b"2", qos=1)
        assert await asyncio.wait_for(two.get(), 5) == f"{base}/data/2"
        assert one.empty()

        await router.detach(h2)  # last holder: UNSUBSCRIBE at the broker
        assert f"{base}/data/#" not in router.filters()
        unmatched = router.unmatched
        await pub.publish(f"{base}/data/3", b"3", qos=1)
        await pub.publish(f"{base}/sentinel", b"s", qos=1)
        # Same publisher, same subscriber: the broker keeps order, so once the sentinel
        # is here, data/3 would have arrived before it had the subscription survived.
        assert await asyncio.wait_for(sentinel.get(), 5) == f"{base}/sentinel"
        assert router.unmatched == unmatched
        assert one.empty() and two.empty()
        await router.aclose()
