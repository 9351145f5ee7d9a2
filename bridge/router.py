"""The one place inbound MQTT messages fan out to the parts that asked for them.

A transport has a single ``message_handler``; the callback server's consumer, the edge
agent's command handler and the REST proxy's subscriptions all need messages from the
same connection. ``MessageRouter`` installs itself as that handler and dispatches each
message to every route whose filter matches it (``TopicFilter.matches``: MQTT §4.7,
so ``#`` never matches a ``$``-topic, and ``$share/{group}/f`` routes on ``f``).

It also owns broker subscriptions, reference-counted per exact filter: two parts that
subscribe to the same filter share one SUBSCRIBE, and the UNSUBSCRIBE is sent only when
the last one lets go (an UNSUBSCRIBE would otherwise cut off the other).

Acknowledgements (for a transport with ``manual_ack``): a route added with
``manual_ack=True`` owns the broker ack of the messages it receives and reports it with
``router.ack(message)``; the PUBACK goes out once every manual route that got the
message has acked. A message no manual route matched is acked right after dispatch.
A manual handler that raises leaves its message unacknowledged: the broker redelivers it
after the next reconnect (at-least-once), which is the safe way to fail.

Overlapping subscriptions: Mosquitto and AWS IoT Core send one copy of a publication per
matching subscription of the connection (MQTT §3.3.4 allows it), and neither tells which
subscription a copy is for (AWS IoT has no MQTT 5 Subscription Identifiers). Handed to
every matching route, each copy would reach each route once more: a REST proxy push sent
twice under two delivery ids, a command run twice. So a copy -- the same payload again on
the topic, within ``COPY_WINDOW`` seconds, no other payload on it between, while fewer
copies than the connection's other matching subscriptions have come -- is acknowledged
and not dispatched. Only subscriptions that are not shared are counted: a shared one
sends its copy to one member of its group, maybe another replica, and a copy expected in
vain would take the next identical publication for it. Its copy, when it comes, is
dispatched again (at least once, as before); so is a copy at another QoS than the first
(the broker keeps a QoS 1 one until acked) and a redelivery (DUP, or after a
reconnect). A broker that sends one copy leaves the
same gap: only an identical publication right after, on such a topic, is taken for a
copy; envelopes never repeat (each has its own id).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from bridge.errors import TransportError
from bridge.service.taskset import TaskSet
from bridge.topic import REMEMBERED_TOPIC_CHARS, TopicFilter
from bridge.transport.base import InboundMessage, Transport

__all__ = ["Handle", "Handler", "MessageRouter"]

log = logging.getLogger(__name__)

#: Topics (at most REMEMBERED_TOPIC_CHARS long, at most this many) whose matching routes
#: are remembered.
_REMEMBERED_TOPICS = 8192

#: Seconds within which the same topic and payload again is a broker's copy for another
#: of this connection's matching subscriptions (copies of one publication are sent back
#: to back: one incoming PUBLISH, one copy per subscription).
COPY_WINDOW = 2.0
#: At most this many publications awaiting copies are remembered (expired ones go first).
_AWAITED_COPIES = 4096

Handler = Callable[[InboundMessage], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class Handle:
    """What ``add`` returns; give it back to ``remove``."""

    id: int
    filter: str


@dataclass(frozen=True, slots=True)
class _Route:
    handle: Handle
    topic_filter: TopicFilter
    handler: Handler
    manual_ack: bool


@dataclass(slots=True)
class _BrokerSub:
    count: int
    qos: int


@dataclass(slots=True)
class _Copies:
    """A publication dispatched on a topic several broker subscriptions match."""

    payload: bytes   # another payload on the topic ends the wait: copies come together
    qos: int         # a copy at another QoS is dispatched (the broker keeps a QoS 1 one)
    left: int        # copies still to come from the broker
    until: float     # monotonic deadline; later, the same payload is a new publication


@dataclass(frozen=True, slots=True)
class _Match:
    """What a topic matches: the routes, and how many of our broker subscriptions that
    are not shared (each sends a copy)."""

    routes: tuple[_Route, ...]
    subscriptions: int


@dataclass(slots=True)
class _Unacked:
    message: InboundMessage  # held so id(message) stays unique while tracked
    remaining: int


class MessageRouter:
    """Dispatches a transport's inbound messages to handlers registered per filter."""

    def __init__(self, transport: Transport, *, drain_timeout: float = 5.0) -> None:
        self.transport = transport
        self.drain_timeout = drain_timeout
        #: Called (sync or async) with messages that no route matched; they are acked.
        self.fallback: Handler | None = None
        self.received = 0
        self.unmatched = 0
        self.handler_errors = 0
        #: Copies of one publication for overlapping subscriptions, acked and not dispatched.
        self.copies = 0
        self._ids = itertools.count(1)
        self._routes: dict[int, _Route] = {}
        # Rebuilt on add/remove so dispatch (per message) never copies the dict.
        self._snapshot: tuple[_Route, ...] = ()
        # The routes each recent topic matched (cleared with the snapshot): matching every
        # filter against every message was ~5 % of the callback server's CPU.
        self._matched: dict[str, _Match] = {}
        self._subs: dict[str, _BrokerSub] = {}
        self._sub_filters: tuple[TopicFilter, ...] = ()  # the ones not shared
        # By topic: the publication whose further copies are still to come.
        self._awaited: dict[str, _Copies] = {}
        # Broker (un)subscribes are rare; one lock keeps the refcount and the broker's
        # state in step without per-filter lock bookkeeping.
        self._sub_lock = asyncio.Lock()
        self._unacked: dict[int, _Unacked] = {}
        # Handler tasks; _guard catches handler errors, so a crash here is the router's bug.
        self._tasks = TaskSet("router")
        transport.message_handler = self._dispatch
        # a new connection: what a copy was awaited for is redelivered whole if unacked
        transport.add_connection_listener(lambda up: self._awaited.clear())

    # -- routes ---------------------------------------------------------------------
    def add(self, topic_filter: str, handler: Handler, *, manual_ack: bool = False) -> Handle:
        """Route messages matching ``topic_filter`` to ``handler`` (no broker traffic).

        ``handler`` may be sync or async; an async one runs as a kept task. With
        ``manual_ack`` the handler must call ``router.ack(message)`` when it is done.
        """
        flt = TopicFilter(topic_filter)
        handle = Handle(next(self._ids), flt.value)
        self._routes[handle.id] = _Route(handle, flt, handler, manual_ack)
        self._snapshot = tuple(self._routes.values())
        self._matched = {}
        return handle

    def remove(self, handle: Handle) -> None:
        """Stop routing to ``handle``'s handler; removing twice is harmless."""
        if self._routes.pop(handle.id, None) is not None:
            self._snapshot = tuple(self._routes.values())
            self._matched = {}

    @property
    def routes(self) -> int:
        return len(self._routes)

    async def attach(self, topic_filter: str, handler: Handler, *, qos: int = 1,
                     manual_ack: bool = False) -> Handle:
        """``add`` plus a reference-counted broker ``subscribe``; undo with ``detach``."""
        handle = self.add(topic_filter, handler, manual_ack=manual_ack)
        try:
            await self.subscribe(topic_filter, qos)
        except BaseException:
            self.remove(handle)
            raise
        return handle

    async def detach(self, handle: Handle) -> None:
        """Undo ``attach``: remove the route, release its broker subscription."""
        if handle.id in self._routes:
            self.remove(handle)
            await self.unsubscribe(handle.filter)

    # -- broker subscriptions (reference-counted per exact filter) -------------------------
    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Take a reference on ``topic_filter``; SUBSCRIBE at the broker on the first.

        A later caller asking for a higher QoS re-subscribes: a SUBSCRIBE for an existing
        filter replaces its QoS (MQTT §3.8.4). Raises TransportError if the broker refuses.
        """
        flt = TopicFilter(topic_filter).value
        async with self._sub_lock:
            entry = self._subs.get(flt)
            if entry is None:
                try:
                    await self._broker_subscribe(flt, qos)
                except BaseException:
                    # The transport may still hold the filter for re-subscribing after
                    # a reconnect; clear that once we no longer hold the lock.
                    self._spawn(self._drop_orphan(flt), f"router-orphan-{flt}")
                    raise
                self._subs[flt] = _BrokerSub(1, qos)
                self._subscriptions_changed()
                return
            if qos > entry.qos:
                await self._broker_subscribe(flt, qos)
                entry.qos = qos
            entry.count += 1

    async def unsubscribe(self, topic_filter: str) -> None:
        """Drop a reference; UNSUBSCRIBE at the broker when it was the last.

        Never raises for broker trouble (it is cleanup): failures are logged.
        """
        async with self._sub_lock:
            entry = self._subs.get(topic_filter)
            if entry is None:
                log.warning("unsubscribe of %s, which has no subscription", topic_filter)
                return
            entry.count -= 1
            if entry.count > 0:
                return
            del self._subs[topic_filter]
            self._subscriptions_changed()
            await self._broker_unsubscribe(topic_filter)

    def _subscriptions_changed(self) -> None:
        self._sub_filters = tuple(f for f in map(TopicFilter, self._subs)
                                  if f.share_group is None)
        self._matched = {}

    def filters(self) -> dict[str, int]:
        """Broker-level filters and how many holders each has."""
        return {flt: entry.count for flt, entry in self._subs.items()}

    async def _broker_subscribe(self, flt: str, qos: int) -> None:
        try:
            await self.transport.subscribe(flt, qos)
        except TimeoutError as exc:
            raise TransportError(f"no SUBACK for {flt!r}") from exc

    async def _broker_unsubscribe(self, flt: str) -> None:
        try:
            await self.transport.unsubscribe(flt)
        except (TransportError, TimeoutError) as exc:
            log.warning("UNSUBSCRIBE %s failed: %s", flt, exc or type(exc).__name__)

    async def _drop_orphan(self, flt: str) -> None:
        async with self._sub_lock:
            if flt not in self._subs:
                await self._broker_unsubscribe(flt)

    # -- dispatch ---------------------------------------------------------------------
    def _dispatch(self, message: InboundMessage) -> None:
        """The transport's ``message_handler``: runs in the event loop, never raises."""
        self.received += 1
        topic = message.topic
        match = self._matched.get(topic)
        if match is None:
            match = _Match(tuple(r for r in self._snapshot if r.topic_filter.matches(topic)),
                           sum(1 for f in self._sub_filters if f.matches(topic)))
            if len(topic) <= REMEMBERED_TOPIC_CHARS:
                if len(self._matched) >= _REMEMBERED_TOPICS:
                    self._matched.clear()
                self._matched[topic] = match
        if match.subscriptions > 1 and not (message.retain or message.dup) \
                and self._is_copy(message, match):
            self.copies += 1
            self.transport.ack(message)
            return
        matched = match.routes
        manual = sum(1 for r in matched if r.manual_ack)
        if manual and message.qos > 0:
            # Registered before any handler runs, so a handler may ack synchronously.
            self._unacked[id(message)] = _Unacked(message, manual)
        if matched:
            for route in matched:
                self._call(route.handler, message, route.handle.filter, route.manual_ack)
        else:
            self.unmatched += 1
            if self.fallback is not None:
                self._call(self.fallback, message, "<fallback>", False)
            else:
                log.debug("no route for message on %s", topic)
        if not manual:
            self.transport.ack(message)

    def _is_copy(self, message: InboundMessage, match: _Match) -> bool:
        """Whether ``message`` is a further copy of a publication already dispatched
        (see the module's docstring); if not, it is the first, and its copies are awaited.
        Never one: a retained message (it comes for one new subscription only), one sent
        again (DUP: a redelivery runs its handlers again, as at-least-once promises) or
        one at another QoS than the first copy's."""
        topic, now = message.topic, time.monotonic()
        awaited = self._awaited.get(topic)
        if awaited is not None and awaited.payload == message.payload \
                and awaited.qos == message.qos and awaited.until >= now:
            awaited.left -= 1
            if awaited.left <= 0:
                del self._awaited[topic]
            return True
        if len(self._awaited) >= _AWAITED_COPIES:
            self._awaited = {k: v for k, v in self._awaited.items() if v.until >= now}
            if len(self._awaited) >= _AWAITED_COPIES:
                self._awaited.clear()
        self._awaited[topic] = _Copies(message.payload, message.qos,
                                       match.subscriptions - 1, now + COPY_WINDOW)
        return False

    def _call(self, handler: Handler, message: InboundMessage, label: str,
              manual_ack: bool) -> None:
        try:
            result = handler(message)
        except Exception:
            self._failed(message, label, manual_ack)
            return
        if inspect.isawaitable(result):
            self._spawn(self._guard(result, message, label, manual_ack),
                        f"route-{label}")

    async def _guard(self, awaitable: Awaitable[None], message: InboundMessage, label: str,
                     manual_ack: bool) -> None:
        try:
            await awaitable
        except Exception:
            self._failed(message, label, manual_ack)

    def _failed(self, message: InboundMessage, label: str, manual_ack: bool) -> None:
        self.handler_errors += 1
        log.exception("handler for %s failed on message %s", label, message.topic)
        if manual_ack and self._unacked.pop(id(message), None) is not None:
            log.warning("message on %s left unacknowledged; the broker will redeliver it",
                        message.topic)

    def ack(self, message: InboundMessage) -> None:
        """A manual-ack route is done with ``message``; PUBACK once all such routes are."""
        key = id(message)
        entry = self._unacked.get(key)
        if entry is None or entry.message is not message:
            return  # QoS 0, already acked, or abandoned after a handler failure
        entry.remaining -= 1
        if entry.remaining <= 0:
            del self._unacked[key]
            self.transport.ack(message)

    @property
    def unacked(self) -> int:
        """Messages waiting for a manual ack (bounded by the broker's Receive Maximum)."""
        return len(self._unacked)

    # -- tasks and lifecycle --------------------------------------------------------------
    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        self._tasks.spawn(coro, name)

    @property
    def pending_tasks(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """Stop dispatching; give running handler tasks ``drain_timeout``, then cancel."""
        if self.transport.message_handler == self._dispatch:
            self.transport.message_handler = None
        await self._tasks.drain(self.drain_timeout)

    async def __aenter__(self) -> MessageRouter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
