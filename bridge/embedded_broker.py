"""An in-process MQTT broker (amqtt) for ``make run`` on a machine with nothing installed.

Production uses Mosquitto or AWS IoT Core; this broker is for the demo only. What amqtt
0.12.1 does with a paho-mqtt 2.x client (MQTT 3.1.1), as measured and as
``tests/test_embedded_broker.py`` asserts:

Works
  - QoS 1 publish and subscribe, PUBACK included; wildcard filters such as
    ``org/+/device/+/#``; payloads far above AWS IoT's 128 KiB.
  - Retained messages (an empty retained payload clears one), last will on an abrupt
    disconnect (not on a clean DISCONNECT), retained wills.
  - Persistent sessions (``clean_session=False``): QoS 1 messages published while the
    subscriber is away are queued and delivered on reconnect — but only for sessions
    not marked anonymous. amqtt's own ``AnonymousAuthPlugin`` marks every session
    anonymous and then drops their queues (``Broker._broadcast_loop``), so this module
    installs :class:`OpenAuthPlugin`, which admits every client without that mark.
  - About 2k QoS 1 msg/s through one client (Mosquitto: ~20k). Ample for a demo.

Does not work
  - MQTT 5: CONNACK "unsupported protocol version". Clients must speak MQTT 3.1.1,
    hence ``?protocol=3.1.1`` in :attr:`EmbeddedBroker.url`; so no MQTT 5 properties,
    no session expiry, no reason codes.
  - Shared subscriptions: ``$share/{group}/...`` is taken as a literal filter and
    matches nothing. Callback-server replicas must not set ``share_group`` here.
  - A QoS 1 message delivered but not yet PUBACKed is discarded after 5 s or when the
    connection drops; it is not redelivered on reconnect (MQTT-4.4.0-1). A subscriber
    that acks only after its database commit can lose that message here.
  - Messages queued for an offline session arrive with the RETAIN flag set, and on
    every connect a client is sent the retained messages matching *any* client's
    subscriptions at QoS 0, subscribed or not. Consumers must ignore topics they did
    not ask for.
  - Nothing survives a restart of the process: sessions and retained messages live in
    memory.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from bridge.errors import TransportError

try:
    from amqtt.broker import Broker
    from amqtt.plugins.base import BaseAuthPlugin
except ImportError:  # the optional `embedded` extra is missing; __aenter__ says so
    Broker = None
    BaseAuthPlugin = object

log = logging.getLogger(__name__)


class OpenAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Admit every client *without* marking it anonymous, so persistent sessions queue."""

    async def authenticate(self, *, session: Any) -> bool:
        return True


class EmbeddedBroker:
    """``async with EmbeddedBroker("127.0.0.1", 1883):`` — a broker for this process's life."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    @property
    def url(self) -> str:
        """The URL clients use; amqtt speaks MQTT 3.1.1 only."""
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    def _config(self) -> dict[str, Any]:
        # One TCP listener, no websocket one; only our auth plugin, so neither the
        # event/packet loggers nor the $SYS publisher of amqtt's defaults run.
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {f"{__name__}.{OpenAuthPlugin.__name__}": {}},
        }

    async def __aenter__(self) -> EmbeddedBroker:
        if Broker is None:
            raise TransportError(
                "the embedded broker needs amqtt: pip install 'pudu-fleet-bridge[embedded]'")
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        broker = Broker(self._config())
        try:
            await broker.start()
        except Exception as exc:
            raise TransportError(f"embedded broker could not listen on {self.url}: {exc}") from exc
        self._broker = broker
        log.info("embedded MQTT broker on %s:%d", self.host, self.port)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()
