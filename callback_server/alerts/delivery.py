"""Tells subscribers of each transition: MQTT ``{prefix}org/{org}/alerts``, the listeners
(the console, ...), and the webhooks as events ``alert.<transition>``.

There is no second webhook delivery here: an alert subscription is a webhook of style
``alert`` (``callback_server.alerts.alert_subscriptions``), so its transitions go by the one
webhook worker, signed, retried and logged as every event is.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from bridge.errors import FleetError
from bridge.topic import TopicScheme
from bridge.transport import Transport
from callback_server.alerts.alert import Transition
from callback_server.webhooks.delivery import WebhookDelivery
from callback_server.webhooks.events import Event

log = logging.getLogger(__name__)


class AlertDelivery:
    """Publishes transitions and submits them to the webhook delivery as events."""

    def __init__(self, transport: Transport | None, webhooks: WebhookDelivery, *,
                 topic_prefix: str = "") -> None:
        self.transport = transport
        self.webhooks = webhooks
        self.topic_prefix = topic_prefix
        self.published = 0
        #: Told of every transition as it is submitted (the console's live feed).
        self.listeners: list[Callable[[Transition], None]] = []

    def submit(self, transition: Transition) -> None:
        """A transition (the engine's ``emit``): told to ``listeners`` whether silenced or
        not; published and sent to webhooks only when not silenced."""
        for listener in self.listeners:
            try:
                listener(transition)
            except Exception:  # a listener's bug must not stop delivery
                log.exception("alert listener failed")
        if transition.silenced:
            return
        self._publish(transition)
        self.webhooks.submit(Event(f"alert.{transition.name}", transition.alert.org,
                                   transition.body(), id=transition.id,
                                   ref=transition.alert.id))

    @property
    def pending(self) -> int:
        """Waiting in the webhook worker (alerts and other events share it)."""
        return self.webhooks.pending

    @property
    def delivered(self) -> int:
        """Transitions delivered to alert subscriptions."""
        return self.webhooks.delivered["alert"]

    @property
    def failed(self) -> int:
        """Transitions alert subscriptions did not take (given up or refused)."""
        return self.webhooks.failed["alert"]

    def _publish(self, transition: Transition) -> None:
        if self.transport is None:
            return
        try:
            topic = str(TopicScheme(transition.alert.org, self.topic_prefix).alerts())
        except FleetError as exc:
            log.warning("alert %s not published: %s", transition.alert.id, exc)
            return
        payload = json.dumps(transition.body(), separators=(",", ":")).encode()
        # QoS 1, not retained: a transition is news, not state (GET /alerts is the state).
        future = self.transport.publish(topic, payload, qos=1, retain=False)

        def done(f: asyncio.Future[None]) -> None:
            if f.cancelled():
                return
            if f.exception() is not None:
                log.warning("alert %s not published on %s: %s", transition.alert.id, topic,
                            f.exception())
            else:
                self.published += 1

        future.add_done_callback(done)
