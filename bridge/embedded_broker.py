"""An in-process MQTT broker (amqtt) for ``make run`` on a machine with nothing installed.

amqtt speaks MQTT 3.1.1 only: clients must connect with ``?protocol=3.1.1`` in their
URL (no MQTT 5 properties, no ``$share`` shared subscriptions). QoS 1, retained
messages, last wills and persistent sessions work, as the tests show. Production uses
Mosquitto or AWS IoT Core.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from bridge.errors import TransportError

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """``async with EmbeddedBroker("127.0.0.1", 1883):`` — a broker for this process's life."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    async def __aenter__(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(config)
        try:
            await self._broker.start()
        except Exception as exc:
            raise TransportError(f"embedded broker could not listen on {self.url}: {exc}") from exc
        log.info("embedded MQTT broker on %s:%d", self.host, self.port)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
