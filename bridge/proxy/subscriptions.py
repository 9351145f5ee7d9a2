"""How subscribers get messages: in-process handlers, SSE queues, signed webhook pushes."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import inspect
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel

from bridge.backoff import backoff_delay
from bridge.errors import ConfigError, OutboundRefusedError
from bridge.router import Handle
from bridge.service.taskset import TaskSet
from bridge.transport.base import InboundMessage

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: An in-process subscriber: ``handler(topic, payload)``, sync or async.
MessageHandler = Callable[[str, bytes], Awaitable[None] | None]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


#: Attempts kept per callback subscription for its delivery log (memory, not the database).
DELIVERY_LOG = 100


# -- settings -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Webhook retries: jittered waits up to base, 2·base, 4·base ... capped (bridge.backoff,
    as every retry loop), at most ``attempts`` tries."""

    attempts: int = 6
    base: float = 1.0
    cap: float = 30.0
    timeout: float = 10.0  # per HTTP attempt

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base <= 0 or self.cap < self.base or self.timeout <= 0:
            raise ConfigError(f"invalid webhook retry policy: {self}")

    @classmethod
    def forwarding(cls, timeout: float | None, max_retries: int | None) -> RetryPolicy:
        """The default with FORWARD_TIMEOUT / FORWARD_MAX_RETRIES where given (None: the
        default's), as both services read them."""
        default = cls()
        return replace(default, timeout=default.timeout if timeout is None else timeout,
                       attempts=default.attempts if max_retries is None else max_retries + 1)

    def delay(self, failures: int) -> float:
        """Wait after the ``failures``-th failed attempt (1-based)."""
        return backoff_delay(failures - 1, self.base, self.cap)


def sign(secret: str, body: bytes) -> str:
    """The ``X-Signature`` header value: ``sha256=<hex HMAC-SHA256(secret, body)>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def message_json(message: InboundMessage) -> dict[str, Any]:
    """A message as JSON: the payload as UTF-8 text, or base64 when it is binary."""
    try:
        payload, encoding = message.payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(message.payload).decode("ascii"), "base64"
    return {"topic": message.topic, "payload": payload, "encoding": encoding,
            "qos": message.qos, "retain": message.retain}


# -- delivery plumbing ----------------------------------------------------------------------
class Mailbox(Generic[T]):
    """Bounded FIFO that drops its OLDEST item when full, counting drops.

    A slow SSE client or a dead webhook receiver must not grow our memory without
    bound; for live telemetry the newest messages are the ones worth keeping.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.dropped = 0
        self.closed = False
        self._items: collections.deque[T] = collections.deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        if self.closed:
            return
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    async def get(self, still: Callable[[], bool] = lambda: True) -> T | None:
        """The next item; None after ``wake()`` or once closed and empty.

        ``still``: asked before waiting and before taking; False: None at once, leaving
        the items for another reader (a replaced SSE reader must not take what its
        successor should send). Safe to cancel (e.g. by ``asyncio.timeout``): nothing is
        taken before the wait.
        """
        if not self._items and not self.closed and still():
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft() if self._items and still() else None

    def wake(self) -> None:
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()


Owner = Literal["rest", "stream", "python"]
#: How delivery went last: the only outcome shown. The remote's status or error text is
#: never shown, so a subscription cannot be used to probe what the service can reach.
Delivery = Literal["delivering", "failing", "refused"]


class Subscription:
    """One subscriber: its filter, where messages go, and delivery statistics."""

    kind: ClassVar[str] = ""

    def __init__(self, sub_id: str, topic_filter: str, qos: int, owner: Owner) -> None:
        self.id = sub_id
        self.filter = topic_filter
        self.qos = qos
        self.owner = owner
        self.created_at = time.time()
        self.delivered = 0
        self.failed = 0
        self.failed_attempts = 0
        self.delivery: Delivery = "delivering"
        self.handle: Handle | None = None
        self.subscribe_task: asyncio.Task[None] | None = None
        self.broker_subscribed = False

    def offer(self, message: InboundMessage) -> Awaitable[None] | None:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        return 0

    @property
    def dropped(self) -> int:
        return 0

    async def close(self) -> None:
        """Stop delivering; queued messages are discarded (they live only in memory)."""

    def describe(self) -> dict[str, Any]:
        """Public view for GET /mqtt/subscriptions; never includes the secret."""
        return {
            "id": self.id, "filter": self.filter, "qos": self.qos, "kind": self.kind,
            "owner": self.owner, "callback_url": None, "created_at": round(self.created_at, 3),
            "delivered": self.delivered, "failed": self.failed,
            "failed_attempts": self.failed_attempts, "delivery": self.delivery,
            "pending": self.pending, "dropped": self.dropped,
        }


class HandlerSubscription(Subscription):
    """An in-process handler called with (topic, payload)."""

    kind = "handler"

    def __init__(self, sub_id: str, topic_filter: str, qos: int, handler: MessageHandler) -> None:
        super().__init__(sub_id, topic_filter, qos, "python")
        self.handler = handler

    def offer(self, message: InboundMessage) -> Awaitable[None] | None:
        try:
            result = self.handler(message.topic, message.payload)
        except Exception as exc:
            self._record(exc)
            raise  # the router logs it
        if inspect.isawaitable(result):
            return self._finish(result)
        self.delivered += 1
        self.delivery = "delivering"
        return None

    async def _finish(self, result: Awaitable[None]) -> None:
        try:
            await result
        except Exception as exc:
            self._record(exc)
            raise
        self.delivered += 1
        self.delivery = "delivering"

    def _record(self, exc: Exception) -> None:
        self.failed += 1
        self.failed_attempts += 1
        self.delivery = "failing"


class StreamSubscription(Subscription):
    """Messages buffered for a Server-Sent-Events reader."""

    kind = "stream"

    def __init__(self, sub_id: str, topic_filter: str, qos: int, owner: Owner,
                 queue_size: int) -> None:
        super().__init__(sub_id, topic_filter, qos, owner)
        self.mailbox: Mailbox[InboundMessage] = Mailbox(queue_size)
        #: The attached SSE response's token (None: nobody reads; messages wait).
        self.reader: object | None = None

    def offer(self, message: InboundMessage) -> None:
        self.mailbox.put(message)

    @property
    def pending(self) -> int:
        return len(self.mailbox)

    @property
    def dropped(self) -> int:
        return self.mailbox.dropped

    async def close(self) -> None:
        self.mailbox.close()  # an attached reader finishes its response

    @property
    def reader_attached(self) -> bool:
        return self.reader is not None

    def attach_reader(self) -> object:
        """A new reader's token. It replaces any attached one: a client reconnecting after
        a half-open connection must not be refused while the service has not yet noticed
        the old one is dead. The old reader stops taking messages and ends."""
        token = object()
        self.reader = token
        self.mailbox.wake()
        return token

    def detach_reader(self, token: object) -> None:
        if self.reader is token:  # a replaced reader leaving must not detach its successor
            self.reader = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "reader_attached": self.reader_attached}


@dataclass(frozen=True, slots=True)
class Queued:
    message: InboundMessage
    received_at: float
    seq: int


class WebhookSubscription(Subscription):
    """Signed POSTs to ``callback_url``, in order, by one worker task, with retries."""

    kind = "webhook"

    def __init__(self, sub_id: str, topic_filter: str, qos: int, *, callback_url: str,
                 secret: str, client: httpx.AsyncClient, retry: RetryPolicy,
                 queue_size: int) -> None:
        super().__init__(sub_id, topic_filter, qos, "rest")
        self.callback_url = callback_url
        self._secret = secret
        self._client = client
        self._retry = retry
        self._seq = itertools.count(1)
        #: The last attempts, newest last: GET /mqtt/subscriptions/{id}/deliveries.
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=DELIVERY_LOG)
        self.mailbox: Mailbox[Queued] = Mailbox(queue_size)
        self.in_flight = False
        self.idle = asyncio.Event()  # set while nothing is queued or being delivered
        self.idle.set()
        #: The worker, in a set of its own: a crash is logged, and close() stops it (the
        #: proxy's own set drains on its stop bound; this one ends with the subscription).
        self._tasks = TaskSet(f"webhook subscription {sub_id}")
        self._tasks.spawn(self._run(), f"webhook-{sub_id}")

    def offer(self, message: InboundMessage) -> None:
        if self.mailbox.closed:
            return
        self.idle.clear()
        self.mailbox.put(Queued(message, time.time(), next(self._seq)))

    @property
    def pending(self) -> int:
        return len(self.mailbox) + int(self.in_flight)

    @property
    def dropped(self) -> int:
        return self.mailbox.dropped

    @property
    def workers(self) -> list[str]:
        """The running worker's task name (none once closed)."""
        return self._tasks.names()

    async def close(self) -> None:
        self.mailbox.close()
        await self._tasks.cancel()
        self.idle.set()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "callback_url": self.callback_url}

    async def _run(self) -> None:
        while True:
            item = await self.mailbox.get()
            if item is None:
                if self.mailbox.closed:
                    return
                continue
            self.in_flight = True
            try:
                await self._deliver(item)
            except Exception:  # a bug here must not silently stop the worker
                self.failed += 1
                self.delivery = "failing"
                log.exception("webhook worker of subscription %s failed", self.id)
            finally:
                self.in_flight = False
                if not self.mailbox:
                    self.idle.set()

    def _record(self, item: Queued, attempt: int, status: int | None, started: float,
                outcome: str, error: str | None) -> None:
        """One ended attempt in the delivery log, shaped as a webhook's delivery row
        (``status``, ``latency_ms``, ``outcome``): an attempt still waiting for its answer
        is not in the log, so it never reads as failed. ``status_code`` is the name this
        log used first; ``error`` names an exception's class or the outbound rule's
        refusal, never the receiver's answer."""
        self.log.append({
            "delivery_id": f"{self.id}-{item.seq}", "attempt": attempt,
            "at": round(time.time(), 3), "status": status, "status_code": status,
            "latency_ms": round((time.monotonic() - started) * 1000, 1), "outcome": outcome,
            "error": error})

    async def _deliver(self, item: Queued) -> None:
        import httpx  # already loaded by the client that MqttProxy made for this subscription

        body = json.dumps({
            **message_json(item.message),
            "received_at": round(item.received_at, 3),
            "subscription_id": self.id,
            "delivery_id": f"{self.id}-{item.seq}",  # the same on every retry: dedupe on it
        }, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Signature": sign(self._secret, body),
            "X-Subscription-Id": self.id,
        }
        attempts = self._retry.attempts
        for attempt in range(1, attempts + 1):
            retryable, status, noted, outcome = True, None, None, "failed"
            started = time.monotonic()
            try:
                response = await self._client.post(
                    self.callback_url, content=body, headers=headers, timeout=self._retry.timeout
                )
            except OutboundRefusedError as exc:
                # Checked at every connect: the name now resolves where we may not go
                # (DNS rebinding). Not retried: the next message is checked afresh.
                retryable, outcome, error = False, "refused", exc.message
                noted = error
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
                noted = type(exc).__name__
            else:
                status = response.status_code
                if response.is_success:
                    outcome = "delivered"
                else:
                    error = f"HTTP {status}"
                    # Other 4xx (and 3xx: we do not follow redirects) will not change on retry.
                    retryable = status >= 500 or status in (408, 429)
            last = attempt == attempts or not retryable
            if outcome == "failed" and last:
                outcome = "gave_up"
            self._record(item, attempt, status, started, outcome, noted)
            if outcome == "delivered":
                self.delivered += 1
                self.delivery = "delivering"
                return
            self.failed_attempts += 1
            self.delivery = "refused" if outcome == "refused" else "failing"
            if last:
                break
            await asyncio.sleep(self._retry.delay(attempt))
        self.failed += 1
        # The operator's log may say why; the API only ever says ``delivery``.
        log.warning("webhook delivery %s-%s failed for good after attempt %d/%d: %s",
                    self.id, item.seq, attempt, attempts, error)


