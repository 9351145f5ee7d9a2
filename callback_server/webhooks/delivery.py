"""The dispatch of events to the webhooks that want them, each POSTed by the one signed,
retried POST (``callback_server.signed_post``) and logged attempt by attempt.

One worker per webhook keeps its events in order; a slow receiver delays only its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bridge.backoff import backoff_delay
from bridge.errors import StoreError
from bridge.http.outbound import OutboundPolicy, client
from bridge.service.taskset import Lanes
from callback_server.signed_post import Retry, post_signed
from callback_server.webhooks.events import Event
from callback_server.webhooks.store import Webhook, WebhookStore

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


class WebhookDelivery:
    """Owns the client and one worker per webhook; enter it, run ``run``, ``submit``."""

    def __init__(self, store: WebhookStore, policy: OutboundPolicy, retry: Retry,
                 timeout: float, *, clock: Callable[[], float] = time.time,
                 cache_seconds: float = 2.0) -> None:
        self.store = store
        self.policy = policy
        self.retry = retry
        self.timeout = timeout
        self.clock = clock
        self.cache_seconds = cache_seconds
        #: Outcomes by webhook style: ``event`` webhooks and ``alert`` subscriptions.
        self.delivered: dict[str, int] = {"event": 0, "alert": 0}
        self.failed: dict[str, int] = {"event": 0, "alert": 0}
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._dispatching = 0
        self._lanes: Lanes[Webhook, Event] = Lanes(self.deliver, "webhook")
        self._client: httpx.AsyncClient | None = None
        self._hooks: list[Webhook] | None = None
        self._read_at = 0.0

    async def __aenter__(self) -> WebhookDelivery:
        self._client = client(self.policy, timeout=self.timeout)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._lanes.close()
        if self._client is not None:
            await self._client.aclose()

    def submit(self, event: Event) -> None:
        """Queue an event (the event source's ``emit``); never blocks the caller."""
        self._queue.put_nowait(event)

    def changed(self) -> None:
        """A webhook was added or removed here: read them again for the next event."""
        self._hooks = None

    @property
    def pending(self) -> int:
        """Events not yet delivered everywhere (queued, being dispatched or delivered)."""
        return self._queue.qsize() + self._dispatching + self._lanes.pending

    async def run(self) -> None:
        while True:
            event = await self._queue.get()
            self._dispatching = 1  # off the queue, not yet in a lane
            try:
                # Alert transitions are rare and were always matched against the
                # subscriptions as stored (another replica may have just added one); the
                # frequent robot events use the list read at most cache_seconds ago.
                for hook in await self._webhooks(fresh=event.name.startswith("alert.")):
                    if hook.wants(event.name, event.org, event.data.get("rule")):
                        self._lanes.put(hook.id, hook, event)
            except Exception:  # a bug must not end delivery of every later event
                log.exception("event %s not dispatched", event.id)
            finally:
                self._dispatching = 0

    async def _webhooks(self, *, fresh: bool = False) -> list[Webhook]:
        """The webhooks, read at most every ``cache_seconds`` (other replicas add some too)
        unless ``fresh``."""
        now = time.monotonic()
        if fresh or self._hooks is None or now - self._read_at > self.cache_seconds:
            attempt = 0
            while True:
                try:
                    self._hooks = await self.store.all()
                    break
                except StoreError as exc:
                    delay = backoff_delay(attempt, 0.5, 30.0)
                    attempt += 1
                    log.warning("webhooks unreadable (%s); retrying in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
            self._read_at = now
        return self._hooks

    async def deliver(self, hook: Webhook, event: Event) -> str:
        """POST one event to one webhook; every attempt is a row of its delivery log."""
        assert self._client is not None, "enter WebhookDelivery first"
        body, headers = self._request(hook, event)

        async def record(attempt: int, status: int | None, latency: float | None,
                         outcome: str) -> None:
            try:
                await self.store.record(hook.id, event.id, event.name, attempt, status,
                                        latency, outcome, self.clock(), event.ref)
            except StoreError as exc:  # the log is for people; delivery goes on without it
                log.warning("delivery log of %s not written: %s", hook.id, exc)

        outcome = await post_signed(self._client, hook.url, hook.secret, body, headers,
                                    self.retry, record)
        style = hook.style if hook.style in self.delivered else "event"
        if outcome == "delivered":
            self.delivered[style] += 1
        else:
            self.failed[style] += 1
            log.warning("event %s (%s) not delivered to webhook %s: %s", event.id,
                        event.name, hook.id, outcome)
        return outcome

    @staticmethod
    def _request(hook: Webhook, event: Event) -> tuple[bytes, dict[str, str]]:
        """Body and headers: the event body, or an alert subscription's (the transition's
        body and ``subscription_id``, as alert subscriptions have always been sent)."""
        body: dict[str, Any]
        if hook.style == "alert":
            body = {**event.data, "subscription_id": hook.id}
            headers = {"X-Subscription-Id": hook.id,
                       "X-Alert-Transition": event.name.removeprefix("alert.")}
        else:
            body = {**event.body(), "webhook_id": hook.id}
            headers = {"X-Webhook-Id": hook.id, "X-Event": event.name, "X-Event-Id": event.id}
        return json.dumps(body, separators=(",", ":"), default=str).encode(), headers
