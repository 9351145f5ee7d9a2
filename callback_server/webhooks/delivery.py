"""The one signed, retried POST every webhook uses (events and alert transitions), and
the dispatch of events to the webhooks that want them.

A POST is signed ``X-Signature: sha256=<hex HMAC-SHA256(secret, body)>`` (the scheme of
``callback_url`` pushes; ``bridge.verify_signature`` checks it), sent by the outbound
client (``bridge.outbound``: no private address unless ``CALLBACK_URL_ALLOW``), and
retried with full-jitter exponential back-off up to ``attempts`` times (FORWARD_TIMEOUT /
FORWARD_MAX_RETRIES); each attempt is told to ``record`` with its HTTP status and latency.
One worker per webhook keeps its events in order; a slow receiver delays only its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from bridge.backoff import backoff_delay
from bridge.errors import OutboundRefusedError, StoreError
from bridge.outbound import OutboundPolicy, client
from bridge.proxy import sign
from bridge.tasks import Lanes
from callback_server.webhooks.events import Event
from callback_server.webhooks.store import Webhook, WebhookStore

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: ``record(attempt, status, latency_ms, outcome)``: one row of a delivery log.
Record = Callable[[int, int | None, float | None, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Retry:
    """How many attempts and how long to wait between them."""

    attempts: int
    base_seconds: float
    cap_seconds: float


async def post_signed(http: httpx.AsyncClient, url: str, secret: str, body: bytes,
                      headers: Mapping[str, str], retry: Retry, record: Record) -> str:
    """POST ``body`` signed, retrying within bounds; the outcome (``delivered``,
    ``gave_up`` or ``refused``). A refusal by the outbound rule is not retried, nor a
    4xx other than 408/429 (nor a 3xx: no redirects are followed)."""
    import httpx  # loaded by ``client`` already

    sent = {"Content-Type": "application/json", **headers, "X-Signature": sign(secret, body)}
    outcome = "gave_up"
    for attempt in range(1, retry.attempts + 1):
        retryable, status, started = True, None, time.monotonic()
        try:
            response = await http.post(url, content=body, headers=sent)
        except OutboundRefusedError:
            outcome, retryable = "refused", False  # checked at connect: not retried
        except httpx.HTTPError as exc:
            log.info("webhook POST to %s attempt %d: %s", url, attempt, type(exc).__name__)
            outcome = "failed"
        else:
            status = response.status_code
            if response.is_success:
                outcome = "delivered"
            else:
                retryable = status >= 500 or status in (408, 429)
                outcome = "failed"
        latency = round((time.monotonic() - started) * 1000, 1)
        last = attempt == retry.attempts or not retryable
        if outcome == "failed" and last:
            outcome = "gave_up"
        await record(attempt, status, latency, outcome)
        if outcome == "delivered" or last:
            return outcome
        await asyncio.sleep(backoff_delay(attempt, retry.base_seconds, retry.cap_seconds))
    return outcome



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
        self.delivered = 0
        self.failed = 0
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
                for hook in await self._webhooks():
                    if hook.wants(event.name, event.org):
                        self._lanes.put(hook.id, hook, event)
            except Exception:  # a bug must not end delivery of every later event
                log.exception("event %s not dispatched", event.id)
            finally:
                self._dispatching = 0

    async def _webhooks(self) -> list[Webhook]:
        """The webhooks, read at most every ``cache_seconds`` (other replicas add some too)."""
        now = time.monotonic()
        if self._hooks is None or now - self._read_at > self.cache_seconds:
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
        body = json.dumps({**event.body(), "webhook_id": hook.id}, separators=(",", ":"),
                          default=str).encode()

        async def record(attempt: int, status: int | None, latency: float | None,
                         outcome: str) -> None:
            try:
                await self.store.record(hook.id, event.id, event.name, attempt, status,
                                        latency, outcome, self.clock())
            except StoreError as exc:  # the log is for people; delivery goes on without it
                log.warning("delivery log of %s not written: %s", hook.id, exc)

        outcome = await post_signed(
            self._client, hook.url, hook.secret, body,
            {"X-Webhook-Id": hook.id, "X-Event": event.name, "X-Event-Id": event.id},
            self.retry, record)
        if outcome == "delivered":
            self.delivered += 1
        else:
            self.failed += 1
            log.warning("event %s (%s) not delivered to webhook %s: %s", event.id,
                        event.name, hook.id, outcome)
        return outcome
