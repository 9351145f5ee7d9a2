"""The MQTT side of the callback server: one (shared) subscription, manual acks.

Every message is acknowledged to the broker only after its rows are committed (or,
if malformed, after it is in the dead-letter table), so a crash or a database outage
loses nothing: the broker redelivers what we never acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bridge.envelope import Envelope
from bridge.errors import PayloadError, TopicError
from bridge.router import MessageRouter
from bridge.topic import GATEWAY_CHANNELS, all_devices_filter, parse_device_topic
from bridge.transport import InboundMessage
from callback_server.batcher import BatchWriter

log = logging.getLogger(__name__)

GatewayHandler = Callable[[str, str, str, bytes], None]  # org, device, channel, payload


class Consumer:
    """Routes inbound messages: envelopes to the batch writer, the rest to handlers."""

    def __init__(
        self,
        router: MessageRouter,
        writer: BatchWriter,
        *,
        topic_prefix: str = "",
        share_group: str | None = None,
    ) -> None:
        self.router = router
        self.writer = writer
        self.topic_prefix = topic_prefix
        self.filter = all_devices_filter(topic_prefix, share_group)
        self.received = 0
        self.malformed = 0
        self.gateway_handlers: list[GatewayHandler] = []

    def route(self) -> None:
        """Register with the router; must happen before the transport connects, because a
        resumed session delivers queued messages right after CONNACK."""
        self.router.add(self.filter.value, self.on_message, manual_ack=True)

    def on_message(self, message: InboundMessage) -> None:
        """Runs in the event loop for each delivery; never raises."""
        self.received += 1

        def ack() -> None:
            self.router.ack(message)

        try:
            address = parse_device_topic(message.topic, self.topic_prefix)
        except TopicError as exc:
            self._dead(message, str(exc), ack)
            return
        if address.channel in GATEWAY_CHANNELS:
            for handler in self.gateway_handlers:
                try:
                    handler(address.org_id, address.device_id, address.channel, message.payload)
                except Exception:  # a bad handler must not stop consumption
                    log.exception("gateway handler failed for %s", message.topic)
            ack()
            return
        try:
            envelope = Envelope.from_json(message.payload)
        except PayloadError as exc:
            self._dead(message, str(exc), ack)
            return
        if envelope.device != address.device_id or envelope.org != address.org_id:
            self._dead(message, "envelope org/device differ from the topic's", ack)
            return
        self.writer.submit(message.topic, envelope, ack)

    def _dead(self, message: InboundMessage, reason: str, ack: Callable[[], None]) -> None:
        self.malformed += 1
        log.warning("dead-lettering message on %s: %s", message.topic, reason)
        self.writer.submit_dead(message.topic, message.payload, reason, ack)
