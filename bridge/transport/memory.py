"""An in-process MQTT backend (``MQTT_BACKEND=memory``) for tests and the demo only.

It has the broker semantics the product relies on, so the parts above the transport can
be tested in milliseconds without Mosquitto: QoS 1 acknowledgements delivered
asynchronously (on a later loop iteration, never inline), ``+``/``#`` and
``$share/{group}/`` routing, a copy per matching subscription, retained messages,
persistent sessions that queue while a client is away and redeliver what it never
acknowledged, MQTT 5 Receive Maximum, last will on a crash, and refusals with a PUBACK
reason code. Nothing survives the process, so ``run`` refuses it except on a callback
server without gateways (Pudu posts its webhooks there: no broker is needed).

Brokers are named by the URL's host (``mqtt://demo``); every transport on the same name
in one process talks to the same ``MemoryBroker``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from bridge.errors import NotConnectedError, PublishRefusedError
from bridge.topic import TopicFilter
from bridge.transport.base import (
    InboundMessage,
    MqttSettings,
    Transport,
    refused_future,
    refused_topic,
)

__all__ = ["MemoryBroker", "MemoryTransport"]

log = logging.getLogger(__name__)

#: topic, payload -> an MQTT 5 PUBACK reason code to refuse with (e.g. 0x87), or None.
Refusal = Callable[[str, bytes], int | None]
_REASONS = {0x80: "unspecified error", 0x87: "not authorized", 0x90: "topic name invalid",
            0x95: "packet too large", 0x97: "quota exceeded", 0x99: "payload format invalid"}


@dataclass
class _Session:
    client_id: str
    persistent: bool
    receive_maximum: int
    transport: MemoryTransport | None = None
    filters: dict[str, int] = field(default_factory=dict)
    queued: collections.deque[InboundMessage] = field(default_factory=collections.deque)
    unacked: dict[int, InboundMessage] = field(default_factory=dict)
    mids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class MemoryBroker:
    """One in-process broker; ``named`` gives the one for a host name."""

    _named: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self) -> None:
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, tuple[bytes, int]] = {}
        self.refuse: Refusal = lambda topic, payload: None
        self.up = True
        self.published = 0
        self._rotation: dict[str, int] = collections.defaultdict(int)

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        broker = cls._named.get(name)
        if broker is None:
            broker = cls._named[name] = cls()
        return broker

    # -- what tests do to the broker ----------------------------------------------------
    def stop(self) -> None:
        """The broker goes away: every client is disconnected (sessions are kept)."""
        self.up = False
        for session in self.sessions.values():
            if session.transport is not None:
                session.transport._lost()

    def start(self) -> None:
        """The broker is back: clients reconnect and resume their sessions."""
        self.up = True
        for session in list(self.sessions.values()):
            if session.transport is not None:
                session.transport._reconnect()

    def crash_client(self, client_id: str) -> None:
        """The client vanished without DISCONNECT: its will is published."""
        session = self.sessions.get(client_id)
        if session is not None and session.transport is not None:
            transport = session.transport
            transport._lost()
            session.transport = None
            will = transport.settings.will
            if will is not None:
                self.publish(will.topic, will.payload, will.qos, will.retain)

    # -- the protocol ---------------------------------------------------------------------
    def connect(self, transport: MemoryTransport) -> bool:
        """CONNECT; returns whether a session was present (MQTT 5 Session Present)."""
        s = transport.settings
        old = self.sessions.get(s.client_id)
        present = old is not None and not s.clean_start and old.persistent
        if not present:
            old = self.sessions[s.client_id] = _Session(
                s.client_id, persistent=not s.clean_start,
                receive_maximum=max(1, s.receive_maximum))
        assert old is not None
        old.transport = transport
        # §4.4: unacknowledged QoS 1 messages are resent first, with DUP set.
        for mid in sorted(old.unacked):
            message = old.unacked[mid]
            old.unacked[mid] = InboundMessage(message.topic, message.payload, message.qos,
                                              message.retain, mid, dup=True)
            transport._deliver_later(old.unacked[mid])
        self._pump(old)
        return present

    def disconnect(self, client_id: str) -> None:
        session = self.sessions.get(client_id)
        if session is None:
            return
        session.transport = None
        if not session.persistent:
            del self.sessions[client_id]

    def subscribe(self, client_id: str, topic_filter: str, qos: int) -> None:
        session = self.sessions[client_id]
        session.filters[topic_filter] = qos
        flt = TopicFilter(topic_filter)
        if flt.share_group is None:  # §4.8.2: no retained messages on shared subscriptions
            for topic, (payload, rqos) in sorted(self.retained.items()):
                if flt.matches(topic):
                    self._enqueue(session, topic, payload, min(qos, rqos), retain=True)
        self._pump(session)

    def unsubscribe(self, client_id: str, topic_filter: str) -> None:
        self.sessions[client_id].filters.pop(topic_filter, None)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int | None:
        """Route one message; a reason code if refused (nothing routed then)."""
        code = self.refuse(topic, payload)
        if code is not None:
            return code
        self.published += 1
        if retain:
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)  # §3.3.1.3: empty retained payload clears
        groups: dict[str, list[tuple[_Session, int]]] = collections.defaultdict(list)
        for session in self.sessions.values():
            for flt_value, sub_qos in session.filters.items():
                flt = TopicFilter(flt_value)
                if not flt.matches(topic):
                    continue
                if flt.share_group is None:
                    # One copy per matching subscription, as Mosquitto and AWS IoT Core
                    # send (MQTT §3.3.4 allows one or several).
                    self._enqueue(session, topic, payload, min(qos, sub_qos), retain=False)
                else:
                    groups[flt_value].append((session, sub_qos))
        for flt_value, members in groups.items():
            live = [m for m in members if m[0].transport is not None] or members
            turn = self._rotation[flt_value] % len(live)
            self._rotation[flt_value] += 1
            session, sub_qos = live[turn]
            self._enqueue(session, topic, payload, min(qos, sub_qos), retain=False)
        for session in self.sessions.values():
            self._pump(session)
        return None

    def ack(self, client_id: str, mid: int) -> None:
        session = self.sessions.get(client_id)
        if session is not None and session.unacked.pop(mid, None) is not None:
            self._pump(session)

    def _enqueue(self, session: _Session, topic: str, payload: bytes, qos: int,
                 *, retain: bool) -> None:
        if qos == 0 and session.transport is None:
            return  # QoS 0 is not queued for an absent client
        session.queued.append(InboundMessage(topic, payload, qos, retain))

    def _pump(self, session: _Session) -> None:
        """Deliver queued messages within the client's Receive Maximum."""
        transport = session.transport
        if transport is None or not transport.connected_event.is_set():
            return
        while session.queued and len(session.unacked) < session.receive_maximum:
            m = session.queued.popleft()
            if m.qos == 0:
                transport._deliver_later(m)
                continue
            mid = next(session.mids)
            message = InboundMessage(m.topic, m.payload, m.qos, m.retain, mid)
            session.unacked[mid] = message
            transport._deliver_later(message)
            if not transport.settings.manual_ack:
                self.ack(session.client_id, mid)  # auto-ack once handed to the client


class MemoryTransport(Transport):
    """A client of a ``MemoryBroker``; acks and deliveries come on later loop iterations."""

    def __init__(self, settings: MqttSettings, broker: MemoryBroker | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.broker = broker if broker is not None else MemoryBroker.named(settings.host)
        self._pending: list[tuple[str, bytes, int, bool, asyncio.Future[None]]] = []
        self._filters: dict[str, int] = {}  # subscribed on connect where the session lacks one
        self._started = False

    @property
    def max_qos(self) -> int:
        return 1

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = True
        self._reconnect()

    async def stop(self) -> None:
        if not self._started:
            return
        offline = self.settings.offline
        if offline is not None and self.connected:
            await self.publish(offline.topic, offline.payload, offline.qos, offline.retain)
        self._started = False
        self.broker.disconnect(self.settings.client_id)
        for *_, fut in self._pending:
            if not fut.done():
                fut.set_exception(NotConnectedError("transport stopped before PUBACK"))
        self._pending.clear()
        self._notify_connection(False)

    def _reconnect(self) -> None:
        if not self._started or not self.broker.up or self.connected:
            return
        self.connected_event.set()  # connected before the session replays into us
        present = self.broker.connect(self)
        held = self.broker.sessions[self.settings.client_id].filters if present else {}
        for topic_filter, qos in self._filters.items():
            if held.get(topic_filter) != qos:  # not kept, or asked for while away
                self.broker.subscribe(self.settings.client_id, topic_filter, qos)
        self._notify_connection(True)
        birth = self.settings.birth
        if birth is not None:
            self.broker.publish(birth.topic, birth.payload, birth.qos, birth.retain)
        pending, self._pending = self._pending, []
        for topic, payload, qos, retain, fut in pending:  # what waited while away
            self._send(topic, payload, qos, retain, fut)

    def _lost(self) -> None:
        if self.connected:
            self._notify_connection(False)

    def _deliver_later(self, message: InboundMessage) -> None:
        assert self._loop is not None
        self._loop.call_soon(self._deliver, message)

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> asyncio.Future[None]:
        loop = self._loop or asyncio.get_running_loop()
        if (refused := refused_topic(topic)) is not None:
            return refused_future(loop, refused)
        fut: asyncio.Future[None] = loop.create_future()
        if not self.connected:
            if qos == 0:
                fut.set_exception(NotConnectedError("not connected; QoS 0 is not queued"))
            else:
                self._pending.append((topic, payload, qos, retain, fut))
            return fut
        self._send(topic, payload, qos, retain, fut)
        return fut

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool,
              fut: asyncio.Future[None]) -> None:
        code = self.broker.publish(topic, payload, qos, retain)
        assert self._loop is not None
        # The PUBACK arrives on a later iteration, as from a real broker.
        if code is None:
            self._loop.call_soon(_resolve, fut, None)
        else:
            error = PublishRefusedError(_REASONS.get(code, "refused"), code)
            self._loop.call_soon(_resolve, fut, error)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._filters[topic_filter] = qos
        if not self.connected:
            return  # sent on connect, as the network transports do
        await asyncio.sleep(0)  # the SUBACK, on a later iteration
        self.broker.subscribe(self.settings.client_id, topic_filter, qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        self._filters.pop(topic_filter, None)
        if self.connected:
            self.broker.unsubscribe(self.settings.client_id, topic_filter)

    def ack(self, message: InboundMessage) -> None:
        if message.qos > 0:
            self.broker.ack(self.settings.client_id, message.mid)


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
