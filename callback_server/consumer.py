"""The MQTT side of the callback server: one (shared) subscription, manual acks.

Every message ends in exactly one of these ways: its rows are committed (or found
already stored: a redelivery), then it is acknowledged; it is gateway traffic, handled
and acknowledged; or it is dead-lettered with the reason (once), then acknowledged; or,
only while the database is unreachable, it is held unacknowledged and retried. No
exception, from decoding to row building, may leave a message unacknowledged: each
one holds a slot of the broker's in-flight window, and when the window is full the
broker stops delivering to us altogether. Messages received and not yet acknowledged
are tracked so health can say when the stream has stalled.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable

from bridge import frames, strictjson
from bridge.envelope import Envelope
from bridge.errors import FleetError
from bridge.router import MessageRouter
from bridge.topic import (
    BATCH_CHANNEL,
    GATEWAY_CHANNELS,
    DeviceAddress,
    all_devices_filter,
    channel_for,
    parse_device_topic,
    scheme_of,
)
from bridge.transport import InboundMessage
from callback_server.batcher import BatchWriter, OnCommit, Outcome, Reason, Settled

log = logging.getLogger(__name__)

GatewayHandler = Callable[[DeviceAddress, bytes], None]
#: Gateway channels whose messages are envelopes to store (and ack after the commit):
#: ``poll`` run records become ``ingestion_runs`` rows. The rest go to the handlers.
STORED_GATEWAY_CHANNELS = ("poll",)


def handled_by_gateway(channel: str) -> bool:
    """A gateway's own traffic that is handled in memory, not stored as an envelope."""
    return (channel in GATEWAY_CHANNELS and channel not in STORED_GATEWAY_CHANNELS
            and channel != BATCH_CHANNEL)


def frame_element(frame_topic: str, address: DeviceAddress, obj: object, prefix: str,
                  notes: list[str] | None = None) -> tuple[str, Envelope | None, str | None]:
    """One element of a batch frame that came on ``address`` (the gateway's ``batch``
    topic): (the element's own device topic, its envelope, None) or (topic, None, why
    it is dead). An element must belong to the frame's org and gateway: a gateway can
    only batch what it could have published itself."""
    topic = frame_topic
    try:
        envelope = Envelope.from_dict(obj, notes=notes)
    except FleetError as exc:
        return topic, None, Reason.MALFORMED.because(f"batch element: {exc}")
    if (envelope.org, envelope.gateway) != (address.org_id, address.device_id):
        return topic, None, Reason.INCONSISTENT.because(
            f"batch element of {envelope.org}/{envelope.gateway} in a frame of "
            f"{address.org_id}/{address.device_id}")
    try:
        topic = str(scheme_of(envelope.org, prefix).device(
            envelope.device, envelope.channel or channel_for(envelope.type)))
    except FleetError as exc:
        return topic, None, Reason.MALFORMED.because(f"batch element: {exc}")
    return topic, envelope, None


def consistent(address: DeviceAddress, envelope: Envelope) -> bool:
    """An envelope must name the org and device of the topic it came on (else one
    gateway could write another org's robots)."""
    return (address.org_id, address.device_id) == (envelope.org, envelope.device)


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
        self.handled = 0  # gateway traffic, from MQTT or HTTP ingest
        self.gateway_handlers: list[GatewayHandler] = []
        # delivery number -> monotonic time received, oldest first (acks come in any order)
        self._unacked: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._numbers = itertools.count()

    def route(self) -> None:
        """Register with the router; must happen before the transport connects, because a
        resumed session delivers queued messages right after CONNACK."""
        self.router.add(self.filter.value, self.on_message, manual_ack=True)

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def oldest_unacked_seconds(self, now: float | None = None) -> float:
        """How long the oldest message not yet acknowledged has waited (0: none waits)."""
        if not self._unacked:
            return 0.0
        first = next(iter(self._unacked.values()))
        return max(0.0, (time.monotonic() if now is None else now) - first)

    def on_message(self, message: InboundMessage) -> None:
        """Runs in the event loop for each delivery; never raises, never drops an ack."""
        self.received += 1
        number = next(self._numbers)
        self._unacked[number] = time.monotonic()

        def ack(settled: Settled | None = None) -> None:
            # Whatever the outcome (stored, duplicate, handled, dead-lettered), it is
            # settled: acknowledged, so the broker never redelivers it.
            if self._unacked.pop(number, None) is not None:
                self.router.ack(message)

        try:
            reason = self._dispatch(message, ack)
        except Exception as exc:  # a bug must not cost an in-flight slot
            log.exception("unexpected error handling a message on %s", message.topic)
            reason = f"could not be handled: {type(exc).__name__}: {exc}"
        if reason is not None:
            self.malformed += 1
            log.warning("dead-lettering message on %s: %s", message.topic, reason)
            self.writer.submit_dead(message.topic, message.payload, reason, ack)

    def _dispatch(self, message: InboundMessage, ack: OnCommit) -> str | None:
        """Hand the message on (to be acked later) or return why it is dead."""
        try:
            address = parse_device_topic(message.topic, self.topic_prefix)
            if address.channel == BATCH_CHANNEL:
                return self._frame(message, address, ack)
            if handled_by_gateway(address.channel):
                self.on_gateway(address, message.payload)
                ack(Settled(Outcome.HANDLED))
                return None
            envelope = Envelope.from_json(message.payload)
        except FleetError as exc:
            return Reason.MALFORMED.because(str(exc))
        if not consistent(address, envelope):
            return Reason.INCONSISTENT.because("envelope org/device differ from the topic's")
        self.writer.submit(message.topic, envelope, ack)
        return None

    def _frame(self, message: InboundMessage, address: DeviceAddress,
               ack: OnCommit) -> str | None:
        """A batch frame: each element stored or dead-lettered on its own (the
        per-element contract); the frame is acknowledged once every element is settled.
        Returns why the frame as a whole is dead (unreadable), else None."""
        try:
            parsed = strictjson.loads(message.payload)
            objs = frames.elements(parsed.value)
        except FleetError as exc:
            return Reason.MALFORMED.because(f"batch frame: {exc}")
        if not objs:
            ack(Settled(Outcome.HANDLED))
            return None
        left = [len(objs)]

        def part(settled: Settled) -> None:
            left[0] -= 1
            if left[0] == 0:
                ack(settled)

        for obj in objs:
            topic, envelope, dead = frame_element(message.topic, address, obj,
                                                   self.topic_prefix)
            if envelope is not None:
                self.writer.submit(topic, envelope, part)
            else:
                self.malformed += 1
                log.warning("dead-lettering a batch element on %s: %s", message.topic, dead)
                self.writer.submit_dead(topic, strictjson.dumps(obj),
                                        dead or "", part)
        return None

    def on_gateway(self, address: DeviceAddress, payload: bytes) -> None:
        """A gateway's own traffic (presence, telemetry, ...), from MQTT or HTTP ingest."""
        self.handled += 1
        for handler in self.gateway_handlers:
            try:
                handler(address, payload)
            except Exception:  # a bad handler must not stop consumption
                log.exception("gateway handler failed for %s/%s/%s", address.org_id,
                              address.device_id, address.channel)
