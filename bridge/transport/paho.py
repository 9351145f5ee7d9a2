"""paho-mqtt 2.x backend: the only module that imports paho.

paho is thread-based; its callbacks run on our network thread and are handed to the
event loop with ``call_soon_threadsafe`` here and nowhere else. Publishes go the other
way: the event loop queues them and the network thread calls paho's ``publish``. Called
from the event loop, paho took its message lock against the network thread (which holds
it to handle each PUBACK) and made two syscalls per message. This thread also owns
reconnecting, with full-jitter exponential backoff (paho's own backoff has no jitter,
and a fleet of gateways reconnecting in lockstep after a broker restart is a thundering
herd). It reads the socket 64 KiB at a time (paho alone makes three or four ``recv``
calls a message) and writes a burst of publishes corked (one TCP segment each otherwise).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.backoff import backoff_delay
from bridge.errors import ConfigError, NotConnectedError, PublishRefusedError, TransportError
from bridge.transport.base import (
    InboundMessage,
    MqttSettings,
    Transport,
    refused_future,
    refused_topic,
)

log = logging.getLogger(__name__)
_PAHO_LOG = logging.getLogger("paho.mqtt")
#: Messages handed to the handler per event-loop turn (~100 µs each in the callback
#: server), so a burst holds the loop for tens of milliseconds, not seconds. A resumed
#: session's backlog can come all at once: Mosquitto 2.0 sent a callback server 60,000
#: queued messages past its Receive Maximum of 4,000, and handing them on in one turn
#: held its health answer and its batch writer for 2-4 s.
DELIVER_PER_TURN = 256


def _failed(reason: Any) -> bool:
    if isinstance(reason, ReasonCode):
        return bool(reason.is_failure)
    return bool(reason)


_Outgoing = tuple[str, bytes, int, bool, "asyncio.Future[None]"]


@dataclass(slots=True)
class _Sent:
    fut: asyncio.Future[None]
    mid: int
    rc: int
    qos: int


@dataclass(slots=True)
class _Acked:
    mid: int
    failure: tuple[str, int] | None


class _BufferedClient(mqtt.Client):
    """paho, reading its socket up to 64 KiB at a time.

    paho asks the socket for a packet's first byte, then each byte of its length, then
    its body: three or four ``recv`` calls a message, each a syscall. Here they are
    served from what one ``recv`` brought; the network thread handles all of it before
    it waits on the socket again (``buffered``)."""

    _READ = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: Any = None

    def buffered(self) -> bool:
        """Whether bytes read from the current socket are still unhandled."""
        return self._rpos < len(self._rbuf) and self._rsock is self._sock

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rsock is not self._sock:  # a new connection: nothing of the old one
            self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        pos = self._rpos
        if pos >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, self._READ))  # raises as paho expects
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data
            self._rbuf, pos = data, 0
        self._rpos = pos + bufsize
        return self._rbuf[pos:pos + bufsize]


_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux's


@contextlib.contextmanager
def _corked(sock: Any) -> Iterator[None]:
    """Hold a burst's packets in the kernel until all are written: a few segments for
    the burst instead of one each (every segment costs us and the broker a wakeup)."""
    corked = False
    if _CORK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1)
            corked = True
        except OSError:  # not TCP
            pass
    try:
        yield
    finally:
        if corked:
            with contextlib.suppress(OSError):  # closed under us: nothing left to send
                sock.setsockopt(socket.IPPROTO_TCP, _CORK, 0)


class PahoTransport(Transport):
    """Any MQTT 3.1.1/5 broker (Mosquitto, the embedded one) through paho-mqtt."""

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__()
        self.settings = settings
        self._pending: dict[int, asyncio.Future[None]] = {}
        # Publishes waiting for the network thread, in order.
        self._outgoing: collections.deque[_Outgoing] = collections.deque()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._woken = False
        # Network thread -> event loop, in order: _Sent (paho took a publish, or not) and
        # _Acked (PUBACK, or a QoS 0 message written), one call_soon_threadsafe per burst.
        self._events: list[_Sent | _Acked] = []
        self._events_lock = threading.Lock()
        self._capture: list[_Sent | _Acked] | None = None
        # Network thread -> event loop: received messages, in order, one
        # call_soon_threadsafe per burst (each costs the loop a wakeup and two syscalls).
        self._inbox: list[InboundMessage] = []
        self._inbox_lock = threading.Lock()
        self._net_ident = 0
        self._subs: dict[str, int] = {}
        self._sub_waiters: dict[int, asyncio.Future[None]] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.reconnects = 0
        self._client = self._build_client()

    @property
    def max_qos(self) -> int:
        return 2

    # -- construction -------------------------------------------------------------
    def _build_client(self) -> _BufferedClient:
        s = self.settings
        protocol = mqtt.MQTTv5 if s.protocol == 5 else mqtt.MQTTv311
        client = _BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else s.clean_start,
            manual_ack=s.manual_ack,
        )
        # Our own publisher bounds what it puts in flight; paho's queue must never
        # refuse (MQTT_ERR_QUEUE_SIZE is a silent drop for callers that ignore rc).
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            f = s.tls_files
            try:
                client.tls_set(
                    ca_certs=f.ca_file,
                    certfile=f.cert_file,
                    keyfile=f.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError) as exc:  # unreadable, not PEM, key not the cert's
                raise ConfigError(
                    f"cannot use the MQTT TLS files (ca {f.ca_file}, cert {f.cert_file}, "
                    f"key {f.key_file}): {exc}") from exc
        # paho's own ERROR lines carry the socket and TLS errors; its DEBUG chatter per
        # packet stays off whatever the root level is.
        if _PAHO_LOG.level == logging.NOTSET:
            _PAHO_LOG.setLevel(logging.WARNING)
        client.enable_logger(_PAHO_LOG)
        if s.will:
            client.will_set(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        return client

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._woken = False
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(
            target=self._network_loop, name=f"mqtt-{self.settings.client_id}", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        offline = self.settings.offline
        if offline and self.connected:
            try:
                await asyncio.wait_for(
                    self.publish(offline.topic, offline.payload, offline.qos, offline.retain), 2.0
                )
            except (TimeoutError, TransportError):
                log.warning("could not publish offline presence before stopping")
        self._stopping.set()
        self._client.disconnect()
        self._wake()
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, 10.0)
        self._resolve_publishes()  # what the thread reported last
        waiting = [*self._pending.values(), *(item[4] for item in self._outgoing)]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(NotConnectedError("transport stopped before PUBACK"))
        self._pending.clear()
        self._outgoing.clear()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        self._notify_connection(False)

    def _connect_once(self) -> bool:
        s = self.settings
        props = None
        kwargs: dict[str, Any] = {}
        if s.protocol == 5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if s.clean_start else s.session_expiry
            props.ReceiveMaximum = s.receive_maximum
            kwargs["clean_start"] = s.clean_start
            kwargs["properties"] = props
        try:
            rc = self._client.connect(s.host, s.port, s.keepalive, **kwargs)
        except ssl.SSLError as exc:
            # Not a network blip: a certificate problem stays until someone fixes it.
            log.warning("MQTT TLS handshake with %s:%s failed: %s (check the CA, client "
                        "certificate and key files)", s.host, s.port, exc)
            return False
        except OSError as exc:
            log.info("MQTT connect to %s:%s failed: %s", s.host, s.port, exc)
            return False
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def _network_loop(self) -> None:
        """Connect, run paho's loop until the link drops, back off, repeat."""
        self._net_ident = threading.get_ident()
        attempt = 0
        while not self._stopping.is_set():
            self.last_beat = time.monotonic()
            if self._connect_once():
                connacked = False
                while not self._stopping.is_set():
                    self.last_beat = time.monotonic()
                    rc = self._loop_once(1.0)
                    if self._client.is_connected():
                        attempt, connacked = 0, True
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
                if not connacked and self.settings.tls and not self._stopping.is_set():
                    # TLS 1.3: a refused client certificate shows only on the first read.
                    log.warning("MQTT TLS connection to %s:%s closed before CONNACK: was the "
                                "client certificate refused? (paho's error is logged above)",
                                self.settings.host, self.settings.port)
                if self._stopping.is_set():
                    # Flush the DISCONNECT we queued in stop().
                    for _ in range(10):
                        if self._client.socket() is None:  # closed: nothing left to flush
                            break
                        if self._loop_once(0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                            break
                    return
            delay = backoff_delay(attempt, self.settings.backoff_min, self.settings.backoff_max)
            attempt += 1
            self.reconnects += 1
            log.debug("MQTT reconnect in %.2fs (attempt %d)", delay, attempt)
            until = time.monotonic() + delay
            while not self._stopping.is_set() and (left := until - time.monotonic()) > 0:
                self.last_beat = time.monotonic()  # backing off is not hanging
                self._stopping.wait(min(left, 1.0))

    def _loop_once(self, timeout: float) -> MQTTErrorCode:
        """paho's ``loop()``, waking on our socket (queued publishes), not paho's own pair.

        paho's ``loop()`` creates a socketpair that every ``publish`` from another thread
        writes to; driving it through ``loop_read``/``loop_write``/``loop_misc`` avoids it.
        """
        client = self._client
        sock = client.socket()
        if sock is None or self._wake_r is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        wlist = [sock] if client.want_write() else []
        pending = client.buffered() or (
            isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)
        try:
            readable, _, _ = select.select([sock, self._wake_r], wlist, [],
                                           0.0 if pending else timeout)
        except (TypeError, ValueError, OSError):  # closed under us (disconnect)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if sock in readable or pending:
            rc = client.loop_read()
            # paho's loop_read takes one packet while none of ours is in flight: the rest
            # of what was read is handled now, not one select() per message.
            for _ in range(1000):
                if rc or not client.buffered():
                    break
                rc = client.loop_read()
            if rc or client.socket() is None:
                return rc
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
            self._woken = False  # before draining: a publish queued from now on wakes us
        # Only after CONNACK, as paho does with what it queued while disconnected: the
        # SUBSCRIBEs sent on connect go first. Corked, a burst of packets leaves in a
        # few segments: a send each cost us and the broker a segment each. One publish
        # alone is one segment anyway: corking it would only add two system calls.
        queued = len(self._outgoing) if client.is_connected() else 0
        with _corked(sock) if queued > 1 else contextlib.nullcontext():
            if queued:
                self._send_outgoing()
            if client.want_write():
                rc = client.loop_write()
                if rc or client.socket() is None:
                    return rc
        return client.loop_misc()

    def _send_outgoing(self) -> None:
        """Network thread: hand every queued publish to paho, in order."""
        out = self._outgoing
        events: list[_Sent | _Acked] = []
        while out:
            topic, payload, qos, retain, fut = out.popleft()
            captured: list[_Sent | _Acked] = []
            self._capture = captured
            try:
                info = self._client.publish(topic, payload, qos, retain)
            finally:
                self._capture = None
            events.append(_Sent(fut, info.mid, info.rc, qos))
            events += captured  # a QoS 0 message may be written inside publish()
        if events:
            self._report(events)

    def _report(self, events: list[_Sent | _Acked]) -> None:
        with self._events_lock:
            first = not self._events
            self._events += events
        if first:
            self._call(self._resolve_publishes)

    def _wake(self) -> None:
        """Event loop: make the network thread look at its queue (once per burst)."""
        if self._woken or self._wake_w is None:
            return
        self._woken = True
        with contextlib.suppress(OSError):  # full: it is awake anyway
            self._wake_w.send(b"\0")

    # -- paho callbacks (network thread) -> event loop -------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if _failed(reason):
            log.warning("MQTT broker refused connection: %s", reason)
            return
        session_present = bool(getattr(flags, "session_present", False))
        log.info("MQTT connected to %s:%s (session present: %s)",
                 self.settings.host, self.settings.port, session_present)
        # Always, even with a session present: the session holds the subscriptions of the
        # last run, which may differ (another TOPIC_PREFIX, a new route), and a repeated
        # SUBSCRIBE only replaces one (retained messages come again: handlers are idempotent).
        for flt, qos in list(self._subs.items()):
            client.subscribe(flt, qos)
        # Then "online": the broker takes one connection's packets in order, so whoever
        # answers our birth (a command to this gateway) finds us subscribed.
        birth = self.settings.birth
        if birth:
            client.publish(birth.topic, birth.payload, birth.qos, birth.retain)
        self._call(self._notify_connection, True)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if not self._stopping.is_set():
            log.warning("MQTT disconnected: %s", reason)
        self._call(self._notify_connection, False)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        # One wakeup per burst of PUBACKs, not one per PUBACK: a burst of acks read in
        # one pass of paho's loop is handed over together.
        failure = None
        if _failed(reason):
            failure = (str(reason), reason.value if isinstance(reason, ReasonCode) else int(reason))
        captured = self._capture
        if captured is not None and threading.get_ident() == self._net_ident:
            captured.append(_Acked(mid, failure))  # inside our publish(): report after it
        else:
            self._report([_Acked(mid, failure)])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        inbound = InboundMessage(
            topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
            mid=msg.mid, dup=bool(msg.dup),
        )
        with self._inbox_lock:
            first = not self._inbox
            self._inbox.append(inbound)
        if first:
            self._call(self._deliver_inbox)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        failed = [str(r) for r in reasons if _failed(r)]
        self._call(self._resolve_sub, mid, failed)

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                        properties: Any) -> None:
        self._call(self._resolve_sub, mid, [])

    # -- event-loop side ---------------------------------------------------------------
    def _deliver_inbox(self) -> None:
        """Hand on up to ``DELIVER_PER_TURN`` messages, then let the loop run again."""
        with self._inbox_lock:
            messages = self._inbox[:DELIVER_PER_TURN]
            del self._inbox[:DELIVER_PER_TURN]
            more = bool(self._inbox)  # then no new message schedules this: we do
        if more and self._loop is not None:
            self._loop.call_soon(self._deliver_inbox)
        for message in messages:
            try:
                self._deliver(message)
            except Exception:  # as the loop would for one callback: the rest still go
                log.exception("handling a message on %s failed", message.topic)

    def _resolve_publishes(self) -> None:
        with self._events_lock:
            events, self._events = self._events, []
        pending = self._pending
        for event in events:
            if isinstance(event, _Sent):
                self._sent(event)
                continue
            fut = pending.pop(event.mid, None)
            if fut is None or fut.done():
                continue
            if event.failure is None:
                fut.set_result(None)
            else:
                fut.set_exception(PublishRefusedError(*event.failure))

    def _sent(self, sent: _Sent) -> None:
        if sent.qos >= 1:
            # Once paho accepted a QoS >= 1 message into its queue it resends it after a
            # reconnect, whatever the first send returned (NO_CONN, CONN_LOST). Only a
            # full queue means it was not taken -- the silent drop docs/measured.md warns of.
            if sent.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                sent.fut.set_exception(TransportError("paho refused publish: its queue is full"))
                return
        elif sent.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            sent.fut.set_exception(NotConnectedError(
                f"QoS 0 message not sent: {mqtt.error_string(sent.rc)}"))
            return
        self._pending[sent.mid] = sent.fut

    def _resolve_sub(self, mid: int, failed: list[str]) -> None:
        fut = self._sub_waiters.pop(mid, None)
        if fut is None or fut.done():
            return
        if failed:
            fut.set_exception(TransportError(f"broker refused subscription: {', '.join(failed)}"))
        else:
            fut.set_result(None)

    # -- public API (event loop) --------------------------------------------------------
    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        loop = self._loop or asyncio.get_running_loop()
        if (refused := refused_topic(topic)) is not None:
            return refused_future(loop, refused)
        fut: asyncio.Future[None] = loop.create_future()
        if qos == 0 and not self._client.is_connected():
            fut.set_exception(NotConnectedError("not connected; QoS 0 message not sent"))
            return fut
        # Queued even before start(): like paho's own queue, the network thread sends it
        # once connected.
        self._outgoing.append((topic, payload, qos, retain, fut))
        self._wake()
        return fut

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subs[topic_filter] = qos
        if not self._client.is_connected():
            return  # sent on connect
        await self._sub_request(lambda: self._client.subscribe(topic_filter, qos))

    async def unsubscribe(self, topic_filter: str) -> None:
        self._subs.pop(topic_filter, None)
        if self._client.is_connected():
            await self._sub_request(lambda: self._client.unsubscribe(topic_filter))

    async def _sub_request(self, send: Any) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        rc, mid = send()
        if self._client.want_write():
            self._wake()  # not all written: the network thread finishes it
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"paho refused (un)subscribe: {mqtt.error_string(rc)}")
        self._sub_waiters[mid] = fut
        await asyncio.wait_for(fut, 10.0)

    def ack(self, message: InboundMessage) -> None:
        if message.qos == 0:
            return
        rc = self._client.ack(message.mid, message.qos)
        if self._client.want_write():
            self._wake()  # not all written: the network thread finishes it
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # The broker redelivers after reconnect: nothing is lost, only delayed.
            log.info("ack of mid %s not sent: %s", message.mid, mqtt.error_string(rc))
