"""The transport interface every MQTT backend implements (paho, awsiot, memory).

Everything above this interface (outbox publisher, consumer, proxy) is backend-agnostic.
How to reach the broker (``MqttSettings``, parsed from a URL) lives in ``settings.py``.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from bridge.errors import PublishRefusedError, TopicError
from bridge.topic import REMEMBERED_TOPIC_CHARS, Topic
from bridge.transport.settings import MqttSettings, TlsFiles, Will

#: MQTT 5 reason code "Topic Name invalid" (a permanent refusal).
TOPIC_NAME_INVALID = 0x90


def refused_topic(topic: str) -> PublishRefusedError | None:
    """Why no broker takes a publish to ``topic`` (bridge.topic's rules), else None.

    Checked by every backend before anything is queued: a broker answers such a publish
    by disconnecting, and the resend after the reconnect disconnects again, for ever,
    holding up everything queued behind it. Refused here it is permanent, and the
    outbox sets it aside.
    """
    check = _remembered_refusal if len(topic) <= REMEMBERED_TOPIC_CHARS else _refusal
    reason = check(topic)
    return None if reason is None else PublishRefusedError(reason, TOPIC_NAME_INVALID)


def _refusal(topic: str) -> str | None:
    try:
        Topic(topic)
    except TopicError as exc:
        return exc.reason
    return None


#: The same few hundred robots' topics are checked on every publish: the recent 8,192
#: answers for topics of at most REMEMBERED_TOPIC_CHARS are remembered.
_remembered_refusal = functools.lru_cache(maxsize=8192)(_refusal)


def refused_future(loop: asyncio.AbstractEventLoop,
                   error: BaseException) -> asyncio.Future[None]:
    """A publish's future that has already failed with ``error``."""
    fut: asyncio.Future[None] = loop.create_future()
    fut.set_exception(error)
    return fut

__all__ = ["InboundMessage", "MqttSettings", "QoS", "TlsFiles", "Transport", "Will"]

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


MessageHandler = Callable[[InboundMessage], None]
ConnectionListener = Callable[[bool], None]


class Transport(abc.ABC):
    """An MQTT connection owned by one task; an async context manager.

    Entering starts connecting in the background and returns at once (a gateway must
    accept webhooks while the broker is down); the transport reconnects by itself.
    """

    #: The largest payload this backend can publish: MQTT's own bound (a 256 MiB packet)
    #: here; AWS IoT Core's 128 KiB on the awsiot backend. Command answers are cut to it.
    max_payload: int = 268_435_455

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
        """Subscribe now and again after every reconnect that lost the session; asked for
        before start or while away, the SUBSCRIBE goes out on connect, ahead of the birth."""

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
