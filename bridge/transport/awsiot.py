"""AWS IoT Core over MQTT 5 with mutual TLS, on awscrt (the AWS IoT Device SDK v2 client).

awscrt runs its own native threads: it connects, reconnects with jittered exponential
backoff and keeps QoS 1 publishes queued across reconnects by itself. Its callbacks and
futures complete on those threads and are handed to our event loop with
``call_soon_threadsafe`` here and nowhere else.

AWS IoT's limits are checked before anything is queued (docs/design-contracts.md): QoS 0/1 only,
payload <= 128 KiB, topic <= 256 bytes and <= 7 slashes, no ``$aws/`` topics. A publish
that breaks one fails at once with a permanent PublishRefusedError (the outbox sets it
aside) instead of getting the connection closed by AWS, as it would be.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from typing import Any

from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from bridge.errors import (
    ConfigError,
    InputError,
    NotConnectedError,
    PayloadTooLargeError,
    PublishRefusedError,
    TopicNotAllowedError,
    TransportError,
)
from bridge.topic import AWS_MAX_TOPIC_BYTES
from bridge.transport.base import (
    InboundMessage,
    MqttSettings,
    Transport,
    refused_future,
    refused_topic,
)

log = logging.getLogger(__name__)

MAX_PAYLOAD = 128 * 1024
MAX_TOPIC_BYTES = AWS_MAX_TOPIC_BYTES
MAX_TOPIC_SLASHES = 7
_PACKET_TOO_LARGE, _TOPIC_INVALID = 0x95, 0x90


def check_aws_limits(topic: str, payload: bytes, qos: int) -> None:
    """Raise what AWS IoT Core would refuse (it disconnects the client instead)."""
    if qos > 1:
        raise InputError("AWS IoT Core supports QoS 0 and 1 only", field="qos")
    if len(payload) > MAX_PAYLOAD:
        raise PayloadTooLargeError(len(payload), MAX_PAYLOAD, "payload (AWS IoT limit)")
    if topic.startswith("$aws/"):
        raise TopicNotAllowedError(topic, "$aws/ topics are reserved by AWS IoT Core")
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise TopicNotAllowedError(topic, f"longer than AWS IoT's {MAX_TOPIC_BYTES} bytes")
    if topic.count("/") > MAX_TOPIC_SLASHES:
        raise TopicNotAllowedError(topic, f"more than AWS IoT's {MAX_TOPIC_SLASHES} slashes")


class AwsIotTransport(Transport):
    """One awscrt MQTT 5 client; manual acks through awscrt's puback control."""

    max_payload = MAX_PAYLOAD

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__()
        files = settings.tls_files
        if not (files.cert_file and files.key_file):
            raise ConfigError("the awsiot backend needs a client certificate and key "
                              "(MQTT_CERT_FILE, MQTT_KEY_FILE)")
        if settings.protocol != 5:
            raise ConfigError("the awsiot backend speaks MQTT 5 only")
        self.settings = settings
        self.reconnects = 0
        self._client: mqtt5.Client | None = None
        self._subs: dict[str, int] = {}
        self._ack_ids = itertools.count(1)
        self._ack_handles: dict[int, Any] = {}
        self._stopped = threading.Event()

    @property
    def max_qos(self) -> int:
        return 1

    def check_publish(self, topic: str, payload: bytes, qos: int) -> None:
        check_aws_limits(topic, payload, qos)

    # -- construction -------------------------------------------------------------
    def _build_client(self) -> mqtt5.Client:
        s = self.settings
        will = None
        if s.will:
            will = mqtt5.PublishPacket(topic=s.will.topic, payload=s.will.payload,
                                       qos=mqtt5.QoS(s.will.qos), retain=s.will.retain)
        session = (mqtt5.ClientSessionBehaviorType.CLEAN if s.clean_start
                   else mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS)
        try:
            return mqtt5_client_builder.mtls_from_path(
                cert_filepath=s.tls_files.cert_file,
                pri_key_filepath=s.tls_files.key_file,
                ca_filepath=s.tls_files.ca_file,
                endpoint=s.host,
                port=s.port,
                client_id=s.client_id,
                keep_alive_interval_sec=max(s.keepalive, 35),  # > awscrt's 30 s ping timeout
                session_behavior=session,
                session_expiry_interval_sec=0 if s.clean_start else s.session_expiry,
                receive_maximum=s.receive_maximum,
                will=will,
                offline_queue_behavior=(
                    mqtt5.ClientOperationQueueBehaviorType.FAIL_QOS0_PUBLISH_ON_DISCONNECT),
                retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
                min_reconnect_delay_ms=int(s.backoff_min * 1000),
                max_reconnect_delay_ms=int(s.backoff_max * 1000),
                on_publish_received=self._on_publish_received,
                on_lifecycle_connection_success=self._on_connection_success,
                on_lifecycle_connection_failure=self._on_connection_failure,
                on_lifecycle_disconnection=self._on_disconnection,
                on_lifecycle_stopped=lambda data: self._stopped.set(),
                enable_metrics_collection=False,
            )
        except Exception as exc:  # awscrt raises its own AwsCrtError on unusable files
            raise ConfigError(f"cannot build the AWS IoT client (cert {s.tls_files.cert_file}, "
                              f"key {s.tls_files.key_file}, ca {s.tls_files.ca_file}): "
                              f"{exc}") from exc

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped.clear()
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
        client.stop(mqtt5.DisconnectPacket())
        await asyncio.to_thread(self._stopped.wait, 10.0)
        self._client = None
        self._notify_connection(False)

    # -- awscrt callbacks (native threads) -> event loop ---------------------------------
    def _on_connection_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        session_present = bool(data.connack_packet and data.connack_packet.session_present)
        log.info("AWS IoT connected to %s:%s (session present: %s)",
                 self.settings.host, self.settings.port, session_present)
        self._call(self._on_connected)

    def _on_connection_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self.reconnects += 1
        log.warning("AWS IoT connection to %s:%s failed: %s", self.settings.host,
                    self.settings.port, data.exception)

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        if not self._stopped.is_set():
            log.warning("AWS IoT disconnected: %s", data.exception)
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

    @staticmethod
    def _track(fut: asyncio.Future[None], what: str) -> None:
        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.warning("AWS IoT %s failed: %s", what, f.exception())

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
                fut.set_exception(TransportError(f"AWS IoT operation failed: {exc}"))
                return
            error = settle(done.result())
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

        crt_future.add_done_callback(lambda done: self._call(resolve, done))
        return fut

    # -- public API (event loop) --------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> asyncio.Future[None]:
        loop = self._loop or asyncio.get_running_loop()
        if (invalid := refused_topic(topic)) is not None:
            return refused_future(loop, invalid)
        try:
            check_aws_limits(topic, payload, qos)
        except (InputError, PayloadTooLargeError, TopicNotAllowedError) as exc:
            code = _PACKET_TOO_LARGE if isinstance(exc, PayloadTooLargeError) else _TOPIC_INVALID
            return refused_future(loop, PublishRefusedError(str(exc), code))
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
