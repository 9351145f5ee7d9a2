"""Any MQTT 5 broker through awscrt's native client (``MQTT_BACKEND=crt``).

awscrt reads, parses and writes MQTT in C on its own threads: connecting, reconnecting
with jittered exponential backoff and keeping QoS 1 publishes queued across reconnects
included. Against paho, which does all of that in Python, it takes about a third of the
CPU per message received and 60 % per message published (docs/benchmarks.md), which is
what a gateway's small ARM core and a cloud consumer's bill are made of. Its callbacks
and futures complete on those threads and reach our event loop here and nowhere else,
one loop wakeup per burst.

Each callback takes the GIL on its own, one message at a time. At Python's default
switch interval (5 ms) a thread asking for the GIL waits for the holder to give it up, so
with the event loop busy storing a batch each delivery waited up to 5 ms: a callback
server on this client stored 1,200 envelopes/s where paho's thread, which reads many
messages per turn, stored 3,850. A transport that consumes a stream (``manual_ack``,
the callback server's) therefore lowers the process's switch interval to 0.5 ms (never
raises it), where the two stored at the same rate; a publisher's acks come back at the
rate it publishes, and it keeps Python's default.

It speaks MQTT 5 only, QoS 0 and 1. The awsiot backend is this client with AWS IoT
Core's mutual TLS and limits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from awscrt import io, mqtt5

from bridge.errors import ConfigError, NotConnectedError, PublishRefusedError, TransportError
from bridge.transport.base import (
    InboundMessage,
    MqttSettings,
    TlsFiles,
    Transport,
    refused_future,
    refused_topic,
)

log = logging.getLogger(__name__)

_QOS_NOT_SUPPORTED = 0x9B
#: Seconds a thread holding the GIL may run before one of awscrt's threads gets it.
SWITCH_INTERVAL = 0.0005


def tls_options(files: TlsFiles) -> io.TlsContextOptions:
    """The system's trust store or MQTT_CA_FILE, and a client certificate when both
    MQTT_CERT_FILE and MQTT_KEY_FILE are given."""
    if files.cert_file and files.key_file:
        options = io.TlsContextOptions.create_client_with_mtls_from_path(
            files.cert_file, files.key_file)
    else:
        options = io.TlsContextOptions()
    if files.ca_file:
        options.override_default_trust_store_from_path(None, files.ca_file)
    return options


class CrtTransport(Transport):
    """One awscrt MQTT 5 client; manual acks through awscrt's puback control."""

    #: The MQTT_BACKEND name, and who the log lines name.
    backend = "crt"
    label = "MQTT (awscrt)"
    #: awscrt's own checks and flow control beyond MQTT 5's (AWS IoT Core's limits there).
    flow_control = mqtt5.ExtendedValidationAndFlowControlOptions.NONE

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__()
        if settings.protocol != 5:
            raise ConfigError(f"the {self.backend} backend speaks MQTT 5 only")
        self.settings = settings
        self.reconnects = 0
        self._client: mqtt5.Client | None = None
        self._subs: dict[str, int] = {}
        self._ack_ids = itertools.count(1)
        self._ack_handles: dict[int, Any] = {}
        self._stopped = threading.Event()
        self._stopping = False
        # Native threads -> event loop, in order; one call_soon_threadsafe per burst
        # (each costs the loop a wakeup and two syscalls).
        self._calls: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        self._calls_lock = threading.Lock()

    @property
    def max_qos(self) -> int:
        return 1

    # -- construction -------------------------------------------------------------
    def _tls_options(self) -> io.TlsContextOptions | None:
        """TLS for ``mqtts://`` only."""
        return tls_options(self.settings.tls_files) if self.settings.tls else None

    def _build_client(self) -> mqtt5.Client:
        s = self.settings
        will = None
        if s.will:
            will = mqtt5.PublishPacket(topic=s.will.topic, payload=s.will.payload,
                                       qos=mqtt5.QoS(s.will.qos), retain=s.will.retain)
        session = (mqtt5.ClientSessionBehaviorType.CLEAN if s.clean_start
                   else mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS)
        files = s.tls_files
        try:
            options = self._tls_options()
            tls = io.ClientTlsContext(options) if options is not None else None
        except Exception as exc:  # awscrt raises its own AwsCrtError on unusable files
            raise ConfigError(f"cannot build the {self.label} client (cert {files.cert_file}, "
                              f"key {files.key_file}, ca {files.ca_file}): {exc}") from exc
        connect = mqtt5.ConnectPacket(
            client_id=s.client_id,
            username=s.username,
            password=s.password,
            keep_alive_interval_sec=max(s.keepalive, 35),  # > awscrt's 30 s ping timeout
            session_expiry_interval_sec=0 if s.clean_start else s.session_expiry,
            receive_maximum=s.receive_maximum,
            will=will,
        )
        return mqtt5.Client(mqtt5.ClientOptions(
            host_name=s.host,
            port=s.port,
            tls_ctx=tls,
            connect_options=connect,
            session_behavior=session,
            extended_validation_and_flow_control_options=self.flow_control,
            offline_queue_behavior=(
                mqtt5.ClientOperationQueueBehaviorType.FAIL_QOS0_PUBLISH_ON_DISCONNECT),
            retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
            min_reconnect_delay_ms=int(s.backoff_min * 1000),
            max_reconnect_delay_ms=int(s.backoff_max * 1000),
            on_publish_callback_fn=self._on_publish_received,
            on_lifecycle_event_connection_success_fn=self._on_connection_success,
            on_lifecycle_event_connection_failure_fn=self._on_connection_failure,
            on_lifecycle_event_disconnection_fn=self._on_disconnection,
            on_lifecycle_event_stopped_fn=lambda data: self._stopped.set(),
            disable_metrics=True,  # else awscrt appends its SDK name to the username
        ))

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.settings.manual_ack and sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._stopped.clear()
        self._stopping = False
        self._client = self._build_client()
        self._client.start()

    async def stop(self) -> None:
        client = self._client
        if client is None:
            return
        offline = self.settings.offline
        if offline and self.connected:
            try:
                await asyncio.wait_for(
                    self.publish(offline.topic, offline.payload, offline.qos, offline.retain), 2.0)
            except (TimeoutError, TransportError):
                log.warning("could not publish offline presence before stopping")
        self._stopping = True
        client.stop(mqtt5.DisconnectPacket())
        await asyncio.to_thread(self._stopped.wait, 10.0)
        self._client = None
        self._notify_connection(False)

    # -- awscrt callbacks (native threads) -> event loop ---------------------------------
    def _call(self, fn: Callable[..., object], *args: object) -> None:
        with self._calls_lock:
            self._calls.append((fn, args))
            if len(self._calls) > 1:
                return  # a drain is already scheduled and will take this one
        loop = self._loop
        if loop is None or loop.is_closed():
            with self._calls_lock:
                self._calls.clear()
            return
        loop.call_soon_threadsafe(self._run_calls)

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:  # one bad callback must not lose the rest of the burst
                log.exception("%s callback %s failed", self.label, fn)

    def _on_connection_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        session_present = bool(data.connack_packet and data.connack_packet.session_present)
        log.info("%s connected to %s:%s (session present: %s)", self.label,
                 self.settings.host, self.settings.port, session_present)
        self._call(self._on_connected)

    def _on_connection_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self.reconnects += 1
        log.warning("%s connection to %s:%s failed: %s", self.label, self.settings.host,
                    self.settings.port, data.exception)

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        if not self._stopping:
            log.warning("%s disconnected: %s", self.label, data.exception)
        self._call(self._notify_connection, False)

    def _on_publish_received(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        mid = 0
        if self.settings.manual_ack and data.acquire_publish_acknowledgement_control:
            # Must be taken inside this callback; the PUBACK goes out in ack().
            mid = next(self._ack_ids)
            self._ack_handles[mid] = data.acquire_publish_acknowledgement_control()
        message = InboundMessage(topic=packet.topic, payload=bytes(packet.payload or b""),
                                 qos=int(packet.qos), retain=bool(packet.retain), mid=mid)
        self._call(self._deliver, message)

    # -- event-loop side ---------------------------------------------------------------
    def _on_connected(self) -> None:
        # Every time, like the paho backend: the session may hold another run's filters.
        for topic_filter, qos in self._subs.items():
            self._track(self._send_subscribe(topic_filter, qos), f"subscribe {topic_filter}")
        birth = self.settings.birth
        if birth:
            self._track(self.publish(birth.topic, birth.payload, birth.qos, birth.retain),
                        "birth message")
        self._notify_connection(True)

    def _track(self, fut: asyncio.Future[None], what: str) -> None:
        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.warning("%s %s failed: %s", self.label, what, f.exception())

        fut.add_done_callback(done)

    def _bridge(self, crt_future: concurrent.futures.Future[Any],
                settle: Any) -> asyncio.Future[None]:
        """An asyncio future settled by ``settle(result)`` when awscrt's future is done."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def resolve(done: concurrent.futures.Future[Any]) -> None:
            if fut.done():
                return
            exc = done.exception()
            if exc is not None:
                fut.set_exception(TransportError(f"{self.label} operation failed: {exc}"))
                return
            error = settle(done.result())
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

        crt_future.add_done_callback(lambda done: self._call(resolve, done))
        return fut

    def _refusal(self, topic: str, payload: bytes, qos: int) -> PublishRefusedError | None:
        """Why this publish must not be queued at all (it would never be taken)."""
        if (invalid := refused_topic(topic)) is not None:
            return invalid
        if qos > 1:
            return PublishRefusedError("awscrt's MQTT 5 client speaks QoS 0 and 1 only",
                                       _QOS_NOT_SUPPORTED)
        return None

    # -- public API (event loop) --------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> asyncio.Future[None]:
        loop = self._loop or asyncio.get_running_loop()
        if (refusal := self._refusal(topic, payload, qos)) is not None:
            return refused_future(loop, refusal)
        client = self._client
        if client is None or (qos == 0 and not self.connected):
            return refused_future(loop, NotConnectedError("not connected; message not sent"))
        packet = mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS(qos),
                                     retain=retain)

        def settle(result: mqtt5.PublishCompletionData) -> BaseException | None:
            puback = result.puback
            if puback is None or int(puback.reason_code) < 0x80:
                return None
            return PublishRefusedError(puback.reason_string or puback.reason_code.name,
                                       int(puback.reason_code))

        return self._bridge(client.publish(packet), settle)

    def _send_subscribe(self, topic_filter: str, qos: int) -> asyncio.Future[None]:
        assert self._client is not None
        packet = mqtt5.SubscribePacket(
            subscriptions=[mqtt5.Subscription(topic_filter=topic_filter, qos=mqtt5.QoS(qos))])

        def settle(suback: mqtt5.SubackPacket) -> BaseException | None:
            failed = [c.name for c in suback.reason_codes or () if int(c) >= 0x80]
            if failed:
                return TransportError(f"broker refused subscription to {topic_filter}: "
                                      f"{', '.join(failed)}")
            return None

        return self._bridge(self._client.subscribe(packet), settle)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subs[topic_filter] = qos
        if self._client is None or not self.connected:
            return  # sent on connect
        await self._send_subscribe(topic_filter, qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        self._subs.pop(topic_filter, None)
        if self._client is None or not self.connected:
            return
        packet = mqtt5.UnsubscribePacket(topic_filters=[topic_filter])
        await self._bridge(self._client.unsubscribe(packet), lambda unsuback: None)

    def ack(self, message: InboundMessage) -> None:
        handle = self._ack_handles.pop(message.mid, None)
        if handle is None or self._client is None:
            return  # automatic ack, or the connection it belonged to is gone
        self._client.invoke_publish_acknowledgement(handle)
