"""Tells subscribers of each transition: MQTT ``{prefix}org/{org}/alerts`` and signed webhooks.

A webhook is POSTed by ``callback_server.webhooks.delivery.post_signed``, the one signed
(``X-Signature``), retried, outbound-checked POST the event webhooks use too; every attempt
is a row of the subscription's delivery log. One worker per subscription keeps its
transitions in order; a slow receiver delays only its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from bridge.backoff import backoff_delay
from bridge.errors import FleetError, StoreError
from bridge.outbound import OutboundPolicy, client
from bridge.tasks import Lanes
from bridge.topic import TopicScheme
from bridge.transport import Transport
from callback_server.alerts.alert import Transition
from callback_server.alerts.rules import Delivery
from callback_server.alerts.store import AlertStore, AlertSubscription
from callback_server.webhooks.delivery import Retry, post_signed

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


class AlertDelivery:
    """Owns the webhook client and one worker task per subscription; enter it, run ``run``."""

    def __init__(self, store: AlertStore, transport: Transport | None, policy: OutboundPolicy,
                 settings: Delivery, *, topic_prefix: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.transport = transport
        self.policy = policy
        self.settings = settings
        self.topic_prefix = topic_prefix
        self.clock = clock
        self.published = 0
        self.delivered = 0
        self.failed = 0
        #: Told of every transition as it is submitted (the console's live feed).
        self.listeners: list[Callable[[Transition], None]] = []
        self._queue: asyncio.Queue[Transition] = asyncio.Queue()
        self._lanes: Lanes[AlertSubscription, Transition] = Lanes(self.deliver,
                                                                    "alert-webhook")
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> AlertDelivery:
        self._client = client(self.policy, timeout=self.settings.timeout_seconds)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._lanes.close()
        if self._client is not None:
            await self._client.aclose()

    def submit(self, transition: Transition) -> None:
        """Queue a transition (the engine's ``emit``); silenced ones are not delivered.
        Every transition, silenced or not, is told to ``listeners`` (the console)."""
        for listener in self.listeners:
            try:
                listener(transition)
            except Exception:  # a listener's bug must not stop delivery
                log.exception("alert listener failed")
        if not transition.silenced:
            self._queue.put_nowait(transition)

    @property
    def pending(self) -> int:
        return self._queue.qsize() + self._lanes.pending

    async def run(self) -> None:
        """Publish each transition and hand it to the workers of matching subscriptions."""
        while True:
            transition = await self._queue.get()
            try:
                await self._dispatch(transition)
            except Exception:  # a bug must not end delivery of every later transition
                log.exception("alert %s not dispatched", transition.alert.id)

    async def _dispatch(self, transition: Transition) -> None:
        """Publish it, then queue it for each subscription that wants it."""
        self._publish(transition)
        attempt = 0
        while True:
            try:
                subscriptions = await self.store.subscriptions()
                break
            except StoreError as exc:
                delay = backoff_delay(attempt, 0.5, 30.0)
                attempt += 1
                log.warning("alert subscriptions unreadable (%s); retrying in %.1f s",
                            exc, delay)
                await asyncio.sleep(delay)
        for sub in subscriptions:
            if sub.wants(transition.alert):
                self._lanes.put(sub.id, sub, transition)

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

    async def deliver(self, sub: AlertSubscription, transition: Transition) -> str:
        """POST one transition to one subscription (``post_signed``: the one signed,
        retried POST of every webhook); the outcome."""
        assert self._client is not None, "enter AlertDelivery first"
        body = json.dumps({**transition.body(), "subscription_id": sub.id},
                          separators=(",", ":")).encode()
        s = self.settings
        tries = 0

        async def record(attempt: int, status: int | None, latency: float | None,
                         outcome: str) -> None:
            nonlocal tries
            tries = attempt
            await self._record(sub, transition, attempt, outcome)

        outcome = await post_signed(
            self._client, sub.url, sub.secret, body,
            {"X-Subscription-Id": sub.id, "X-Alert-Transition": transition.name},
            Retry(s.attempts, s.base_seconds, s.cap_seconds), record)
        if outcome == "delivered":
            self.delivered += 1
            return outcome
        self.failed += 1
        log.warning("alert %s (%s) not delivered to subscription %s: %s after %d attempts",
                    transition.alert.id, transition.name, sub.id, outcome, tries)
        return outcome

    async def _record(self, sub: AlertSubscription, transition: Transition, attempt: int,
                      outcome: str) -> None:
        try:
            await self.store.record_delivery(sub.id, transition, attempt, outcome, self.clock())
        except StoreError as exc:  # the log is for people; delivery goes on without it
            log.warning("delivery log of %s not written: %s", sub.id, exc)
