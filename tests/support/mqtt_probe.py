"""A plain paho subscriber for tests: what a real consumer of our topics sees."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool
    at: float = 0.0  # time.time() on arrival


class Probe:
    """Subscribes to ``topic_filter``; ``persistent`` keeps a session across disconnects."""

    def __init__(self, url: str, topic_filter: str, *, client_id: str = "",
                 persistent: bool = False) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 1883
        self.filter = topic_filter
        self.messages: list[Seen] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=not persistent)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_connect(self, client: mqtt.Client, *args: object) -> None:
        client.subscribe(self.filter, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Seen(msg.topic, bytes(msg.payload), bool(msg.retain),
                                      time.time()))
            self._cond.notify_all()

    def start(self) -> Probe:
        self._subscribed.clear()
        self.client.connect(self.host, self.port, 30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"probe could not subscribe to {self.filter}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Seen]:
        """Block until at least ``count`` messages arrived (a condition, not a sleep)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.messages) >= count, timeout)
            if not ok:
                raise TimeoutError(f"got {len(self.messages)} of {count} messages")
            return list(self.messages)

    def wait_until(self, check: Callable[[list[Seen]], bool], what: str,
                   timeout: float = 20.0) -> list[Seen]:
        """Block until ``check`` holds for the messages so far (woken by each arrival)."""
        with self._cond:
            if not self._cond.wait_for(lambda: check(self.messages), timeout):
                raise TimeoutError(f"{what}: not within {timeout} s "
                                   f"({len(self.messages)} messages)")
            return list(self.messages)

    def __enter__(self) -> Probe:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def publish_once(url: str, topic: str, payload: bytes | str, *, qos: int = 1) -> None:
    """Publish one message from a throwaway MQTT 5 client and wait for its PUBACK."""
    parts = urlsplit(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos)
        info.wait_for_publish(10)
        assert info.is_published(), f"no PUBACK for {topic}"
    finally:
        client.disconnect()
        client.loop_stop()
