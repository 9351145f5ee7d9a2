"""The transport interface every MQTT backend implements (paho, awsiot, ...).

Everything above this interface (outbox publisher, consumer, proxy) is backend-agnostic.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from bridge.errors import ConfigError

log = logging.getLogger(__name__)

QoS = Literal[0, 1, 2]


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message delivered by the broker. ``mid`` is needed for a manual ack."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    mid: int = 0
    dup: bool = False


@dataclass(frozen=True, slots=True)
class Will:
    """A message the broker publishes for us (last will) or we publish on connect (birth)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Files for TLS / mutual TLS (AWS IoT needs all three)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How to reach the broker and what session to hold there."""

    host: str
    port: int
    client_id: str
    tls: bool = False
    tls_files: TlsFiles = field(default_factory=TlsFiles)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: Literal[5, 4] = 5  # 4 = MQTT 3.1.1 (e.g. the embedded amqtt broker)
    keepalive: int = 30
    clean_start: bool = False  # persistent session: QoS 1 traffic queues while we are away
    session_expiry: int = 7 * 24 * 3600
    manual_ack: bool = False
    # MQTT 5 Receive Maximum: how many unacked QoS 1 messages the broker may push to us.
    # With manual acks held until a database commit this bounds the batch size.
    receive_maximum: int = 1000
    max_inflight: int = 100  # AWS IoT's cap on unacked QoS 1; larger is slower in paho
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    will: Will | None = None
    birth: Will | None = None
    offline: Will | None = None  # published on a graceful stop, since the will is not

    @classmethod
    def from_url(cls, url: str, *, client_id: str, **overrides: object) -> MqttSettings:
        """Build from ``mqtt://[user:pass@]host[:port][?protocol=3.1.1]`` or ``mqtts://``."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"MQTT URL must start with mqtt:// or mqtts://, got {url!r}")
        if not parts.hostname:
            raise ConfigError(f"MQTT URL has no host: {url!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"MQTT URL has a bad port: {url!r}") from exc
        query = parse_qs(parts.query)
        protocol: Literal[5, 4] = 5
        if query.get("protocol", ["5"])[0] in ("3.1.1", "311", "4"):
            protocol = 4
        kwargs: dict[str, object] = {
            "host": parts.hostname,
            "port": port,
            "client_id": client_id,
            "tls": tls,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "protocol": protocol,
        }
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]


MessageHandler = Callable[[InboundMessage], None]
ConnectionListener = Callable[[bool], None]


class Transport(abc.ABC):
    """An MQTT connection owned by one task; an async context manager.

    Entering starts connecting in the background and returns at once (a gateway must
    accept webhooks while the broker is down); the transport reconnects by itself.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        #: monotonic time the network loop last came round (None: not tracked by this
        #: backend), for the systemd watchdog: a loop stuck inside a call stops it.
        self.last_beat: float | None = None
        self.message_handler: MessageHandler | None = None
        self._listeners: list[ConnectionListener] = []
        self.connected_event = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.connected_event.is_set()

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(True|False)`` in the event loop on each (dis)connect."""
        self._listeners.append(listener)

    def _notify_connection(self, up: bool) -> None:
        if up:
            self.connected_event.set()
        else:
            self.connected_event.clear()
        for listener in list(self._listeners):
            listener(up)

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        """From a backend's own thread: run ``fn(*args)`` in the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, message: InboundMessage) -> None:
        handler = self.message_handler
        if handler is None:
            log.warning("dropping message on %s: no handler", message.topic)
            return
        handler(message)

    async def wait_connected(self) -> None:
        await self.connected_event.wait()

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue a publish; the future completes on PUBACK (QoS 1) or once sent (QoS 0).

        QoS 1 messages survive reconnects inside the transport; the future fails with
        TransportError only if the broker refuses the message.
        """

    @abc.abstractmethod
    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect that lost the session."""

    @abc.abstractmethod
    async def unsubscribe(self, topic_filter: str) -> None: ...

    def check_publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Raise TopicError / PayloadError / InputError for what this broker refuses.

        Generic MQTT brokers take what MQTT allows (the topic is checked elsewhere);
        AWS IoT Core has tighter limits (the awsiot backend overrides this).
        """
        return None

    @abc.abstractmethod
    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a message received with ``manual_ack`` (PUBACK to the broker)."""

    @property
    @abc.abstractmethod
    def max_qos(self) -> int:
        """Highest QoS the backend supports (AWS IoT: 1)."""

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
