"""The REST ``/mqtt/*`` proxy both apps mount, and the Python API underneath it.

``MqttProxy`` publishes and subscribes on one transport through the ``MessageRouter``,
confined to configured topic prefixes. Subscribers get messages three ways: an
in-process handler (``subscribe_to_topic``), a Server-Sent-Events stream
(``GET /mqtt/stream``), or a signed webhook POST to a ``callback_url``.

Mounting: ``create_proxy_router(proxy)`` returns the ``APIRouter`` when a token is
configured and ``None`` when it is not; ``None`` means the proxy is OFF and the app
mounts nothing (there is no unauthenticated mode)::

    proxy_router = create_proxy_router(proxy)
    if proxy_router is not None:
        app.include_router(proxy_router)

Errors: the endpoints translate ``FleetError``s to HTTP themselves (``to_http_exception``),
so the router works in any app without extra exception handlers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import inspect
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import httpx
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.types import Receive, Scope, Send

from bridge.errors import (
    ConfigError,
    FleetError,
    InputError,
    NotConnectedError,
    PayloadError,
    PayloadTooLargeError,
    PubackTimeoutError,
    TopicError,
    TopicNotAllowedError,
    TransportError,
)
from bridge.router import Handle, MessageRouter
from bridge.topic import Topic, TopicFilter
from bridge.transport.base import InboundMessage, Transport

__all__ = [
    "MessageHandler",
    "MqttProxy",
    "PayloadTooLargeError",
    "PubackTimeoutError",
    "PublishBody",
    "RetryPolicy",
    "SubscribeBody",
    "TopicNotAllowedError",
    "UnsubscribeBody",
    "create_proxy_router",
    "http_status_for",
    "message_json",
    "sign",
    "to_http_exception",
]

log = logging.getLogger(__name__)

#: An in-process subscriber: ``handler(topic, payload)``, sync or async.
MessageHandler = Callable[[str, bytes], Awaitable[None] | None]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def http_status_for(exc: FleetError) -> int:
    """The one map from our exceptions to HTTP status codes."""
    if isinstance(exc, TopicNotAllowedError):
        return 403
    if isinstance(exc, TopicError):
        return 422
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, PayloadError):
        return 422
    if isinstance(exc, InputError):
        return exc.status
    if isinstance(exc, PubackTimeoutError):
        return 504
    if isinstance(exc, NotConnectedError):
        return 503
    if isinstance(exc, TransportError):
        return 502
    return 500


def to_http_exception(exc: FleetError) -> HTTPException:
    """``exc`` as the HTTPException the endpoints raise: ``{"detail": {...}}``."""
    detail: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, InputError):
        detail["message"] = exc.message
        detail["field"] = exc.field
    elif isinstance(exc, TopicError):
        detail["field"] = "topic"
    elif isinstance(exc, PayloadError):
        detail["field"] = "payload"
    return HTTPException(status_code=http_status_for(exc), detail=detail)


@contextlib.contextmanager
def _http_errors() -> Iterator[None]:
    try:
        yield
    except FleetError as exc:
        raise to_http_exception(exc) from exc


# -- settings -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Webhook retries: waits of base, 2·base, 4·base ... capped, at most ``attempts`` tries."""

    attempts: int = 6
    base: float = 1.0
    cap: float = 30.0
    timeout: float = 10.0  # per HTTP attempt

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base <= 0 or self.cap < self.base or self.timeout <= 0:
            raise ConfigError(f"invalid webhook retry policy: {self}")

    def delay(self, failures: int) -> float:
        """Wait after the ``failures``-th failed attempt (1-based)."""
        return float(min(self.cap, self.base * 2 ** min(failures - 1, 30)))


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
class _Mailbox(Generic[T]):
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

    async def get(self) -> T | None:
        """The next item; None after ``wake()`` or once closed and empty.

        Safe to cancel (e.g. by ``asyncio.timeout``): nothing is taken before the wait.
        """
        if not self._items and not self.closed:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft() if self._items else None

    def wake(self) -> None:
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()


Owner = Literal["rest", "stream", "python"]


class _Subscription:
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
        self.last_error: str | None = None
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
            "failed_attempts": self.failed_attempts, "last_error": self.last_error,
            "pending": self.pending, "dropped": self.dropped,
        }


class _HandlerSubscription(_Subscription):
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
        return None

    async def _finish(self, result: Awaitable[None]) -> None:
        try:
            await result
        except Exception as exc:
            self._record(exc)
            raise
        self.delivered += 1

    def _record(self, exc: Exception) -> None:
        self.failed += 1
        self.last_error = f"{type(exc).__name__}: {exc}"


class _StreamSubscription(_Subscription):
    """Messages buffered for a Server-Sent-Events reader."""

    kind = "stream"

    def __init__(self, sub_id: str, topic_filter: str, qos: int, owner: Owner,
                 queue_size: int) -> None:
        super().__init__(sub_id, topic_filter, qos, owner)
        self.mailbox: _Mailbox[InboundMessage] = _Mailbox(queue_size)
        self.reader_attached = False

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

    def detach_reader(self) -> None:
        self.reader_attached = False

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "reader_attached": self.reader_attached}


@dataclass(frozen=True, slots=True)
class _Queued:
    message: InboundMessage
    received_at: float
    seq: int


class _WebhookSubscription(_Subscription):
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
        self.mailbox: _Mailbox[_Queued] = _Mailbox(queue_size)
        self.in_flight = False
        self.idle = asyncio.Event()  # set while nothing is queued or being delivered
        self.idle.set()
        self._worker = asyncio.create_task(self._run(), name=f"webhook-{sub_id}")

    def offer(self, message: InboundMessage) -> None:
        if self.mailbox.closed:
            return
        self.idle.clear()
        self.mailbox.put(_Queued(message, time.time(), next(self._seq)))

    @property
    def pending(self) -> int:
        return len(self.mailbox) + int(self.in_flight)

    @property
    def dropped(self) -> int:
        return self.mailbox.dropped

    async def close(self) -> None:
        self.mailbox.close()
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
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
            except Exception as exc:  # a bug here must not silently stop the worker
                self.failed += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("webhook worker of subscription %s failed", self.id)
            finally:
                self.in_flight = False
                if not self.mailbox:
                    self.idle.set()

    async def _deliver(self, item: _Queued) -> None:
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
            retryable = True
            try:
                response = await self._client.post(
                    self.callback_url, content=body, headers=headers, timeout=self._retry.timeout
                )
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    self.delivered += 1
                    return
                error = f"HTTP {response.status_code}"
                # Other 4xx (and 3xx: we do not follow redirects) will not change on retry.
                retryable = response.status_code >= 500 or response.status_code in (408, 429)
            self.failed_attempts += 1
            self.last_error = f"attempt {attempt}/{attempts}: {error}"
            if not retryable or attempt == attempts:
                break
            await asyncio.sleep(self._retry.delay(attempt))
        self.failed += 1
        log.warning("webhook delivery %s-%s failed for good: %s",
                    self.id, item.seq, self.last_error)


class _EventStream(Response):
    """A Server-Sent-Events response that notices the client leaving.

    It watches ``receive`` for ``http.disconnect`` itself (whatever the server's ASGI
    version) and always runs ``on_close``, so the broker subscription is released.
    """

    media_type = "text/event-stream"

    def __init__(self, sub: _StreamSubscription, keepalive: float,
                 on_close: Callable[[], None]) -> None:
        self.status_code = 200
        self.background = None
        self._sub = sub
        self._keepalive = keepalive
        self._on_close = on_close
        # No body attribute: no Content-Length; X-Accel-Buffering stops nginx buffering.
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    def _event(name: str, data: dict[str, Any]) -> bytes:
        # json.dumps escapes newlines, so the data is one SSE line.
        return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self._sub
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            sub.mailbox.wake()

        watcher = asyncio.create_task(watch(), name=f"sse-watch-{sub.id}")
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            hello = self._event("subscribed", {"id": sub.id, "topic": sub.filter})
            await send({"type": "http.response.body", "body": hello, "more_body": True})
            reported = sub.mailbox.dropped
            while not gone:
                try:
                    async with asyncio.timeout(self._keepalive):
                        message = await sub.mailbox.get()
                except TimeoutError:
                    chunk = b": keepalive\n\n"  # keeps proxies and idle timers from closing us
                else:
                    if gone:
                        break
                    if message is None:
                        if not sub.mailbox.closed:
                            continue
                        # Unsubscribed, or the proxy is stopping: end the response.
                        await send({"type": "http.response.body", "body": b"",
                                    "more_body": False})
                        break
                    chunk = b""
                    if sub.mailbox.dropped != reported:
                        reported = sub.mailbox.dropped
                        chunk = self._event("dropped", {"dropped": reported})
                    chunk += self._event("message", message_json(message))
                    sub.delivered += 1
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:
            pass  # ASGI >= 2.4 servers raise on send() once the client has gone
        finally:
            self._on_close()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


# -- the proxy ------------------------------------------------------------------------------
class MqttProxy:
    """Publish/subscribe on one transport for HTTP clients and in-process code.

    An async context manager: entering creates the shared HTTP client for webhooks;
    leaving stops delivery workers, ends streams and releases broker subscriptions.
    """

    def __init__(
        self,
        transport: Transport,
        router: MessageRouter,
        *,
        token: str | None,
        allowed_prefixes: Sequence[str],
        max_payload: int = 128 * 1024,
        max_qos: int | None = None,
        retry: RetryPolicy | None = None,
        publish_timeout: float = 5.0,
        stream_queue_size: int = 1000,
        callback_queue_size: int = 1000,
        keepalive_seconds: float = 15.0,
        max_subscriptions: int = 1000,
        close_timeout: float = 5.0,
        broker: str | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if not allowed_prefixes:
            raise ConfigError("allowed_prefixes is empty; pass [''] to allow every topic")
        for prefix in allowed_prefixes:
            if prefix.startswith("$") or "+" in prefix or "#" in prefix:
                raise ConfigError(f"allowed prefix {prefix!r} may not start with '$' "
                                  "or contain wildcards")
        self.transport = transport
        self.router = router
        # An empty token is "not configured": the proxy is off rather than open.
        self.token = token or None
        self.allowed_prefixes = tuple(allowed_prefixes)
        self.max_payload = max_payload
        self.max_qos = transport.max_qos if max_qos is None else min(max_qos, transport.max_qos)
        self.retry = retry or RetryPolicy()
        self.publish_timeout = publish_timeout
        self.stream_queue_size = stream_queue_size
        self.callback_queue_size = callback_queue_size
        self.keepalive_seconds = keepalive_seconds
        self.max_subscriptions = max_subscriptions
        self.close_timeout = close_timeout
        # A JSON string of max_payload bytes can be up to 6x longer (\u00XX escapes):
        # the body cap bounds memory, the payload check is exact.
        self.max_body = 6 * max_payload + 64 * 1024
        settings = getattr(transport, "settings", None)
        self.broker = broker or (f"{settings.host}:{settings.port}" if settings else None)
        self._http = http_client
        self._owns_http = http_client is None
        self._started = False
        self._subs: dict[str, _Subscription] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.published = 0
        self.publish_errors = 0
        self.deliveries = 0

    @property
    def enabled(self) -> bool:
        """Whether the REST router exists (a token is configured)."""
        return self.token is not None

    # -- validation -----------------------------------------------------------------
    def _topic_allowed(self, topic: str) -> bool:
        return topic.startswith(self.allowed_prefixes)

    def check_topic(self, topic: str) -> str:
        """A topic we may publish to, or TopicError (invalid) / TopicNotAllowedError."""
        Topic(topic)
        if topic.startswith("$"):
            raise TopicNotAllowedError(topic, "topics starting with '$' are reserved for the "
                                       "broker ($SYS, $aws, ...) and cannot be used here")
        if not self._topic_allowed(topic):
            raise TopicNotAllowedError(topic, f"outside the allowed prefixes "
                                       f"{list(self.allowed_prefixes)}")
        return topic

    def check_filter(self, topic_filter: str) -> str:
        """A filter we may subscribe to: every topic it can match is inside our prefixes."""
        flt = TopicFilter(topic_filter)
        base = flt.base
        if base.startswith("$"):
            raise TopicNotAllowedError(topic_filter, "filters for '$' topics are reserved for "
                                       "the broker ($SYS, $aws, ...) and cannot be used here")
        literal: list[str] = []
        for level in base.split("/"):
            if level in ("+", "#"):
                fixed = "/".join(literal) + "/" if literal else ""
                allowed = fixed.startswith(self.allowed_prefixes)
                break
            literal.append(level)
        else:
            allowed = self._topic_allowed(base)
        if not allowed:
            raise TopicNotAllowedError(topic_filter, f"can match topics outside the allowed "
                                       f"prefixes {list(self.allowed_prefixes)}")
        return topic_filter

    def check_qos(self, qos: int) -> int:
        if not isinstance(qos, int) or isinstance(qos, bool) or not 0 <= qos <= self.max_qos:
            raise InputError(f"qos must be 0..{self.max_qos} with this broker, got {qos!r}",
                             field="qos")
        return qos

    def encode_payload(self, payload: bytes | str | Any) -> bytes:
        """bytes as they are, str as UTF-8, anything else as compact JSON; size-checked."""
        if isinstance(payload, bytes | bytearray | memoryview):
            data = bytes(payload)
        elif isinstance(payload, str):
            data = payload.encode("utf-8")
        else:
            try:
                data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                                  allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise PayloadError(f"payload cannot be encoded as JSON: {exc}") from exc
        if len(data) > self.max_payload:
            raise PayloadTooLargeError(len(data), self.max_payload)
        return data

    # -- Python API: publish ------------------------------------------------------------
    async def publish_message(self, topic: str, payload: bytes | str | Any, qos: int = 1,
                              retain: bool = False) -> int:
        """Publish and wait for the PUBACK (QoS 1/2) or the send (QoS 0).

        Returns the payload size in bytes. Raises TopicError, PayloadError, InputError
        (qos) or TransportError (PubackTimeoutError, NotConnectedError).
        """
        self.check_topic(topic)
        self.check_qos(qos)
        data = self.encode_payload(payload)
        await self._publish(topic, data, qos, retain)
        return len(data)

    async def _publish(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        try:
            await asyncio.wait_for(self.transport.publish(topic, data, qos, retain),
                                   self.publish_timeout)
        except TimeoutError as exc:
            self.publish_errors += 1
            raise PubackTimeoutError(
                f"no PUBACK for {topic!r} within {self.publish_timeout:g}s; the message is "
                "still queued and may be delivered later") from exc
        except TransportError:
            self.publish_errors += 1
            raise
        self.published += 1

    # -- Python API: subscribe -------------------------------------------------------------
    async def subscribe_to_topic(self, topic_filter: str, handler: MessageHandler, *,
                                 qos: int = 1) -> str:
        """Call ``handler(topic, payload)`` for each matching message; returns the id.

        Returns once the broker granted the subscription (or, while disconnected, once it
        is registered for the next connect).
        """
        sub = _HandlerSubscription(self._new_id(), self.check_filter(topic_filter),
                                   self.check_qos(qos), handler)
        await self._activate(sub)
        return sub.id

    def subscribe_pattern(self, pattern: str, handler: MessageHandler, *, qos: int = 1) -> str:
        """Like ``subscribe_to_topic`` for sync callers; the SUBSCRIBE runs as a kept task.

        A broker refusal is logged and shown as ``last_error`` of the subscription.
        """
        sub = _HandlerSubscription(self._new_id(), self.check_filter(pattern),
                                   self.check_qos(qos), handler)
        self._register(sub)
        sub.subscribe_task = self._spawn(self._subscribe_or_record(sub), f"proxy-sub-{sub.id}")
        return sub.id

    async def unsubscribe(self, subscription_id: str) -> None:
        """Remove a subscription; the broker UNSUBSCRIBE happens if it held the last ref."""
        await self._release(self._get(subscription_id))

    async def add_callback_subscription(self, topic_filter: str, callback_url: str,
                                        secret: str | None = None, *,
                                        qos: int = 1) -> tuple[str, str]:
        """Push matching messages to ``callback_url``; returns (id, signing secret)."""
        if not self._started or self._http is None:
            raise RuntimeError("enter the MqttProxy (async with) before adding webhooks")
        secret = secret or secrets.token_hex(32)
        sub = _WebhookSubscription(
            self._new_id(), self.check_filter(topic_filter), self.check_qos(qos),
            callback_url=callback_url, secret=secret, client=self._http, retry=self.retry,
            queue_size=self.callback_queue_size,
        )
        try:
            await self._activate(sub)
        except BaseException:
            await sub.close()
            raise
        return sub.id, secret

    async def add_stream_subscription(self, topic_filter: str, *, qos: int = 1,
                                      owner: Owner = "rest") -> str:
        """Buffer matching messages for an SSE reader (``GET /mqtt/stream?id=``)."""
        sub = _StreamSubscription(self._new_id(), self.check_filter(topic_filter),
                                  self.check_qos(qos), owner, self.stream_queue_size)
        await self._activate(sub)
        return sub.id

    async def remove_rest_subscription(self, subscription_id: str) -> None:
        """Remove one POST /mqtt/subscribe subscription (409 for streams and app-owned)."""
        sub = self._get(subscription_id)
        if sub.owner != "rest":
            owner = "an open stream" if sub.owner == "stream" else "the application"
            raise InputError(f"subscription {subscription_id} belongs to {owner}",
                             field="id", status=409)
        await self._release(sub)

    async def remove_rest_subscriptions(self, topic_filter: str) -> list[str]:
        """Remove the POST /mqtt/subscribe subscriptions on exactly ``topic_filter``."""
        doomed = [s for s in self._subs.values() if s.filter == topic_filter and s.owner == "rest"]
        for sub in doomed:
            await self._release(sub)
        return [s.id for s in doomed]

    async def flush(self) -> None:
        """Wait until pending SUBSCRIBEs are done and every webhook queue is empty.

        Each queued webhook message is then delivered or counted as failed. Used at
        shutdown (bounded by ``close_timeout``) and by callers that need a settled state.
        """
        while True:
            tasks = [s.subscribe_task for s in self._subs.values()
                     if s.subscribe_task is not None and not s.subscribe_task.done()]
            busy = [s for s in self._subs.values()
                    if isinstance(s, _WebhookSubscription) and not s.idle.is_set()]
            if not tasks and not busy:
                return
            if tasks:
                await asyncio.wait(tasks)
            for sub in busy:
                await sub.idle.wait()

    def subscriptions(self) -> list[dict[str, Any]]:
        """Every subscription's public view (no secrets)."""
        return [sub.describe() for sub in self._subs.values()]

    # -- status --------------------------------------------------------------------------
    async def health_check(self) -> dict[str, Any]:
        """Connection state and counters, for the apps' health endpoints."""
        return {
            "connected": self.transport.connected,
            "subscriptions": len(self._subs),
            "deliveries": self.deliveries,
            "published": self.published,
            "publish_errors": self.publish_errors,
        }

    def status(self) -> dict[str, Any]:
        """What GET /mqtt/status shows."""
        kinds = collections.Counter(sub.kind for sub in self._subs.values())
        webhooks = [s for s in self._subs.values() if isinstance(s, _WebhookSubscription)]
        return {
            "connected": self.transport.connected,
            "broker": self.broker,
            "subscriptions": len(self._subs),
            "subscriptions_by_kind": dict(kinds),
            "broker_filters": len(self.router.filters()),
            "published": self.published,
            "publish_errors": self.publish_errors,
            "deliveries": self.deliveries,
            "webhooks": {
                "delivered": sum(s.delivered for s in webhooks),
                "failed": sum(s.failed for s in webhooks),
                "pending": sum(s.pending for s in webhooks),
            },
            "limits": {"max_payload": self.max_payload, "max_qos": self.max_qos,
                       "allowed_prefixes": list(self.allowed_prefixes)},
        }

    # -- internals -------------------------------------------------------------------------
    def _new_id(self) -> str:
        return "sub_" + secrets.token_hex(8)

    def _get(self, subscription_id: str) -> _Subscription:
        try:
            return self._subs[subscription_id]
        except KeyError:
            raise InputError(f"no subscription {subscription_id!r}", field="id",
                             status=404) from None

    def _on_message(self, sub: _Subscription, message: InboundMessage) -> Awaitable[None] | None:
        # "org/acme/#" also matches "org/acme" itself (MQTT §4.7.1.2), which is outside
        # the prefix "org/acme/": deliver only what the ACL allows.
        if not self._topic_allowed(message.topic):
            return None
        self.deliveries += 1
        return sub.offer(message)

    def _register(self, sub: _Subscription) -> None:
        if len(self._subs) >= self.max_subscriptions:
            raise InputError(f"too many subscriptions (limit {self.max_subscriptions})",
                             status=429)
        sub.handle = self.router.add(sub.filter, partial(self._on_message, sub))
        self._subs[sub.id] = sub

    async def _activate(self, sub: _Subscription) -> None:
        self._register(sub)
        try:
            await self.router.subscribe(sub.filter, sub.qos)
        except BaseException:
            await self._release(sub)
            raise
        sub.broker_subscribed = True

    async def _subscribe_or_record(self, sub: _Subscription) -> None:
        try:
            await self.router.subscribe(sub.filter, sub.qos)
        except TransportError as exc:
            sub.last_error = f"subscribe failed: {exc}"
            log.error("broker refused subscription %s to %s: %s", sub.id, sub.filter, exc)
            return
        sub.broker_subscribed = True

    async def _release(self, sub: _Subscription) -> None:
        self._subs.pop(sub.id, None)
        if sub.handle is not None:
            self.router.remove(sub.handle)
        task = sub.subscribe_task
        if task is not None and not task.done():
            await asyncio.wait([task])  # never cancel mid-SUBSCRIBE: the refcount must settle
        await sub.close()
        if sub.broker_subscribed:
            sub.broker_subscribed = False
            await self.router.unsubscribe(sub.filter)

    def _discard(self, sub: _Subscription) -> None:
        """Sync release (an SSE client left): the broker part runs as a kept task."""
        if sub.id in self._subs:
            self._spawn(self._release(sub), f"proxy-release-{sub.id}")

    async def _open_stream(self, topic_filter: str) -> _StreamSubscription:
        """A subscription owned by one SSE connection (released when it closes)."""
        sub = _StreamSubscription(self._new_id(), self.check_filter(topic_filter),
                                  min(1, self.max_qos), "stream", self.stream_queue_size)
        sub.reader_attached = True
        await self._activate(sub)
        return sub

    def _attach_reader(self, subscription_id: str) -> _StreamSubscription:
        sub = self._get(subscription_id)
        if not isinstance(sub, _StreamSubscription):
            raise InputError(f"subscription {subscription_id} delivers by {sub.kind}, "
                             "not as a stream", field="id", status=409)
        if sub.reader_attached:
            raise InputError(f"subscription {subscription_id} already has a reader",
                             field="id", status=409)
        sub.reader_attached = True
        return sub

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("proxy task %s failed", task.get_name(), exc_info=task.exception())

    # -- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> MqttProxy:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False,
                                           timeout=self.retry.timeout)
        self._started = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._started = False
        for sub in self._subs.values():  # take no new messages while draining
            if sub.handle is not None:
                self.router.remove(sub.handle)
        try:
            async with asyncio.timeout(self.close_timeout):
                await self.flush()  # give queued webhooks their chance first
                for sub in list(self._subs.values()):
                    await self._release(sub)
                if self._tasks:
                    await asyncio.wait(set(self._tasks))
        except TimeoutError:
            log.warning("MQTT proxy did not release its subscriptions within %ss",
                        self.close_timeout)
        for sub in list(self._subs.values()):  # whatever the timeout left behind
            self._subs.pop(sub.id, None)
            if sub.handle is not None:
                self.router.remove(sub.handle)
            await sub.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None


# -- HTTP ------------------------------------------------------------------------------------
class PublishBody(BaseModel):
    """POST /mqtt/publish. A string payload is sent as UTF-8, any other JSON as JSON."""

    model_config = ConfigDict(extra="forbid")

    topic: str
    payload: JsonValue
    qos: Literal[0, 1, 2] = 1
    retain: StrictBool = False
    encoding: Literal["utf-8", "base64"] = "utf-8"  # base64: a string payload is binary


class SubscribeBody(BaseModel):
    """POST /mqtt/subscribe. Without ``callback_url`` messages are read from the stream."""

    model_config = ConfigDict(extra="forbid")

    topic: str
    callback_url: str | None = None
    secret: str | None = Field(default=None, min_length=16, max_length=256)
    qos: Literal[0, 1, 2] = 1

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("callback_url must be an http:// or https:// URL with a host")
        return value

    @model_validator(mode="after")
    def _secret_needs_url(self) -> SubscribeBody:
        if self.secret is not None and self.callback_url is None:
            raise ValueError("secret is only used with callback_url")
        return self


class UnsubscribeBody(BaseModel):
    """POST /mqtt/unsubscribe by ``topic`` (all REST subscriptions on it) or by ``id``."""

    model_config = ConfigDict(extra="forbid")

    topic: str | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> UnsubscribeBody:
        if (self.topic is None) == (self.id is None):
            raise ValueError("give exactly one of topic or id")
        return self


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past ``limit`` without buffering the rest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(int(declared), limit, "request body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(len(body), limit, "request body")
    return bytes(body)


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        field = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors
        )
        raise InputError(message, field=field or None, status=422) from exc


def create_proxy_router(proxy: MqttProxy) -> APIRouter | None:
    """The ``/mqtt/*`` routes, or None when no token is configured (proxy off: mount nothing)."""
    token = proxy.token
    if token is None:
        return None
    expected = token.encode("utf-8")

    async def authorize(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        # Starlette decodes headers as latin-1; re-encoding gives the raw bytes back.
        given = value.strip().encode("latin-1", "replace")
        ok = hmac.compare_digest(given, expected)  # constant time, whatever the scheme
        if not ok or scheme.lower() != "bearer":
            raise HTTPException(401, detail={"error": "AuthError",
                                             "message": "missing or invalid bearer token"},
                                headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/mqtt", tags=["mqtt"], dependencies=[Depends(authorize)])

    @api.post("/publish")
    async def publish(request: Request) -> dict[str, Any]:
        """Publish and answer after the PUBACK (504 without one, 503 if QoS 0 offline)."""
        with _http_errors():
            body = _parse(PublishBody, await _read_body(request, proxy.max_body))
            payload: JsonValue | bytes = body.payload
            if body.encoding == "base64":
                if not isinstance(body.payload, str):
                    raise InputError("base64 encoding needs a string payload", field="payload")
                try:
                    payload = base64.b64decode(body.payload, validate=True)
                except binascii.Error as exc:
                    raise InputError(f"payload is not base64: {exc}", field="payload") from exc
            size = await proxy.publish_message(body.topic, payload, body.qos, body.retain)
        return {"status": "success", "topic": body.topic, "qos": body.qos,
                "retain": body.retain, "bytes": size}

    @api.post("/subscribe")
    async def subscribe(request: Request) -> dict[str, Any]:
        """Webhook subscription when ``callback_url`` is given, else a buffered stream."""
        with _http_errors():
            body = _parse(SubscribeBody, await _read_body(request, 64 * 1024))
            if body.callback_url is not None:
                sub_id, secret = await proxy.add_callback_subscription(
                    body.topic, body.callback_url, body.secret, qos=body.qos)
                # The only time the secret is shown: the receiver needs it to verify.
                return {"status": "success", "id": sub_id, "topic": body.topic,
                        "callback_url": body.callback_url, "secret": secret,
                        "signature": "X-Signature: sha256=<hex HMAC-SHA256(secret, body)>"}
            sub_id = await proxy.add_stream_subscription(body.topic, qos=body.qos)
        return {"status": "success", "id": sub_id, "topic": body.topic,
                "stream": f"/mqtt/stream?id={sub_id}"}

    @api.post("/unsubscribe")
    async def unsubscribe(request: Request) -> dict[str, Any]:
        """Remove REST subscriptions by exact filter, or one by id."""
        with _http_errors():
            body = _parse(UnsubscribeBody, await _read_body(request, 64 * 1024))
            if body.id is not None:
                await proxy.remove_rest_subscription(body.id)
                removed = [body.id]
            else:
                assert body.topic is not None
                removed = await proxy.remove_rest_subscriptions(body.topic)
                if not removed:
                    raise InputError(f"no REST subscription on {body.topic!r}", field="topic",
                                     status=404)
        return {"status": "success", "removed": removed}

    @api.get("/status")
    async def status() -> dict[str, Any]:
        return proxy.status()

    @api.get("/subscriptions")
    async def subscriptions() -> dict[str, Any]:
        subs = proxy.subscriptions()
        return {"count": len(subs), "subscriptions": subs}

    @api.get("/stream")
    async def stream(
        topic: Annotated[str | None, Query()] = None,
        subscription_id: Annotated[str | None, Query(alias="id")] = None,
    ) -> Response:
        """SSE: ``?topic=FILTER`` for a subscription that lives as long as the
        connection, or ``?id=`` to read one made by POST /mqtt/subscribe."""
        with _http_errors():
            if (topic is None) == (subscription_id is None):
                raise InputError("give exactly one of topic or id", field="topic")
            if topic is not None:
                sub = await proxy._open_stream(topic)
                on_close: Callable[[], None] = partial(proxy._discard, sub)
            else:
                assert subscription_id is not None
                sub = proxy._attach_reader(subscription_id)
                on_close = sub.detach_reader
        return _EventStream(sub, proxy.keepalive_seconds, on_close)

    return api
