"""``MqttProxy``: publish and subscribe on one transport, confined to allowed prefixes."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import secrets
from collections.abc import Awaitable, Sequence
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import (
    BaseModel,
)

from bridge.errors import (
    ConfigError,
    ConflictError,
    InputError,
    NotFoundError,
    PayloadError,
    PayloadTooLargeError,
    PubackTimeoutError,
    RateLimitedError,
    TopicNotAllowedError,
    TransportError,
)
from bridge.http.outbound import OutboundPolicy, client
from bridge.proxy.subscriptions import (
    HandlerSubscription,
    MessageHandler,
    Owner,
    RetryPolicy,
    StreamSubscription,
    Subscription,
    WebhookSubscription,
)
from bridge.router import MessageRouter
from bridge.service.taskset import TaskSet
from bridge.topic import Topic, TopicFilter
from bridge.transport.base import InboundMessage, Transport

if TYPE_CHECKING:
    import httpx

    from bridge.commands import Pace

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

#: How an operator widens the prefixes (said with every refusal for being outside them).
_WIDEN = " (widen them with proxy_allowed_prefixes in the service's YAML)"


def check_prefixes(allowed_prefixes: Sequence[str]) -> None:
    """ConfigError unless each prefix can be the start of a plain topic (check-config
    asks too, so a wrong ``proxy_allowed_prefixes`` is found before ``run``)."""
    if not allowed_prefixes:
        raise ConfigError("allowed_prefixes is empty; pass [''] to allow every topic")
    for prefix in allowed_prefixes:
        if prefix.startswith("$") or "+" in prefix or "#" in prefix:
            raise ConfigError(f"allowed prefix {prefix!r} may not start with '$' "
                              "or contain wildcards")


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
        outbound: OutboundPolicy | None = None,
        device: dict[str, Any] | None = None,
        pace: Pace | None = None,
    ) -> None:
        check_prefixes(allowed_prefixes)
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
        # Where webhooks may go; checked when one is added and at every connection.
        self.outbound = outbound or OutboundPolicy()
        #: Who this proxy speaks for (service, org, gateway), shown by GET /mqtt/status.
        self.device = dict(device or {})
        #: Waited on before each publish where the connection is paced (the edge agent's
        #: publisher: its drain and these publishes share one budget); None: unpaced.
        self.pace = pace
        self._http: httpx.AsyncClient | None = None
        self._started = False
        self._subs: dict[str, Subscription] = {}
        self._tasks = TaskSet("proxy")
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
                                       f"{list(self.allowed_prefixes)}{_WIDEN}")
        return topic

    def check_filter(self, topic_filter: str) -> str:
        """A filter we may subscribe to: every topic it can match is inside our prefixes."""
        flt = TopicFilter(topic_filter)
        base = flt.base
        if topic_filter.startswith("$") or base.startswith("$"):
            # $share/ too: a shared subscription would take messages away from the
            # service's own consumers of the same group.
            raise TopicNotAllowedError(topic_filter, "filters starting with '$' ($share, $SYS, "
                                       "$aws, ...) are reserved and cannot be used here")
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
                                       f"prefixes {list(self.allowed_prefixes)}{_WIDEN}")
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
        self.transport.check_publish(topic, data, qos)
        await self._publish(topic, data, qos, retain)
        return len(data)

    async def _publish(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        if self.pace is not None:
            # Outside the PUBACK timeout: a publish waiting for its turn is not yet sent.
            await self.pace(topic, data)
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
        sub = HandlerSubscription(self._new_id(), self.check_filter(topic_filter),
                                   self.check_qos(qos), handler)
        await self._activate(sub)
        return sub.id

    def subscribe_pattern(self, pattern: str, handler: MessageHandler, *, qos: int = 1) -> str:
        """Like ``subscribe_to_topic`` for sync callers; the SUBSCRIBE runs as a kept task.

        A broker refusal is logged and shown as ``delivery: refused`` of the subscription.
        """
        sub = HandlerSubscription(self._new_id(), self.check_filter(pattern),
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
        """Push matching messages to ``callback_url``; returns (id, signing secret).

        OutboundRefusedError (422) when the URL's host is not an allowed destination.
        """
        if not self._started:
            raise RuntimeError("enter the MqttProxy (async with) before adding webhooks")
        self.check_filter(topic_filter)
        self.check_qos(qos)
        await self.outbound.check_url(callback_url)
        if self._http is None:
            self._http = client(self.outbound, timeout=self.retry.timeout)
        secret = secret or secrets.token_hex(32)
        sub = WebhookSubscription(
            self._new_id(), topic_filter, qos,
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
        sub = StreamSubscription(self._new_id(), self.check_filter(topic_filter),
                                  self.check_qos(qos), owner, self.stream_queue_size)
        await self._activate(sub)
        return sub.id

    async def remove_rest_subscription(self, subscription_id: str) -> None:
        """Remove one POST /mqtt/subscribe subscription (409 for streams and app-owned)."""
        sub = self._get(subscription_id)
        if sub.owner != "rest":
            owner = "an open stream" if sub.owner == "stream" else "the application"
            raise ConflictError(f"subscription {subscription_id} belongs to {owner}",
                                field="id")
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
                    if isinstance(s, WebhookSubscription) and not s.idle.is_set()]
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
        webhooks = [s for s in self._subs.values() if isinstance(s, WebhookSubscription)]
        return {
            "connected": self.transport.connected,
            "broker": self.broker,
            "device": self.device,
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

    def delivery_log(self, subscription_id: str) -> list[dict[str, Any]]:
        """A callback subscription's last delivery attempts, newest first (404 otherwise)."""
        sub = self._get(subscription_id)
        if not isinstance(sub, WebhookSubscription):
            raise NotFoundError(f"subscription {subscription_id!r} has no callback_url",
                                field="id")
        return list(reversed(sub.log))

    def subscription_filter(self, subscription_id: str) -> str:
        """The filter of one subscription (404 if there is none), for access checks."""
        return self._get(subscription_id).filter

    def _get(self, subscription_id: str) -> Subscription:
        try:
            return self._subs[subscription_id]
        except KeyError:
            raise NotFoundError(f"no subscription {subscription_id!r}", field="id") from None

    def _on_message(self, sub: Subscription, message: InboundMessage) -> Awaitable[None] | None:
        # "org/acme/#" also matches "org/acme" itself (MQTT §4.7.1.2), which is outside
        # the prefix "org/acme/": deliver only what the ACL allows.
        if not self._topic_allowed(message.topic):
            return None
        self.deliveries += 1
        return sub.offer(message)

    def _register(self, sub: Subscription) -> None:
        if len(self._subs) >= self.max_subscriptions:
            raise RateLimitedError(f"too many subscriptions (limit {self.max_subscriptions})")
        sub.handle = self.router.add(sub.filter, partial(self._on_message, sub))
        self._subs[sub.id] = sub

    async def _activate(self, sub: Subscription) -> None:
        self._register(sub)
        try:
            await self.router.subscribe(sub.filter, sub.qos)
        except BaseException:
            await self._release(sub)
            raise
        sub.broker_subscribed = True

    async def _subscribe_or_record(self, sub: Subscription) -> None:
        try:
            await self.router.subscribe(sub.filter, sub.qos)
        except TransportError as exc:
            sub.delivery = "refused"
            log.error("broker refused subscription %s to %s: %s", sub.id, sub.filter, exc)
            return
        sub.broker_subscribed = True

    async def _release(self, sub: Subscription) -> None:
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

    def discard(self, sub: Subscription) -> None:
        """Sync release (an SSE client left): the broker part runs as a kept task."""
        if sub.id in self._subs:
            self._spawn(self._release(sub), f"proxy-release-{sub.id}")

    async def open_stream(self, topic_filter: str) -> tuple[StreamSubscription, object]:
        """A subscription owned by one SSE connection (released when it closes), and
        that connection's reader token."""
        sub = StreamSubscription(self._new_id(), self.check_filter(topic_filter),
                                  min(1, self.max_qos), "stream", self.stream_queue_size)
        reader = sub.attach_reader()
        await self._activate(sub)
        return sub, reader

    def attach_reader(self, subscription_id: str) -> tuple[StreamSubscription, object]:
        """Read a POST /mqtt/subscribe subscription; the newest reader wins (see
        StreamSubscription.attach_reader), so nothing buffered is lost on reconnect."""
        sub = self._get(subscription_id)
        if not isinstance(sub, StreamSubscription):
            raise ConflictError(f"subscription {subscription_id} delivers by {sub.kind}, "
                                "not as a stream", field="id")
        if sub.owner == "stream":
            raise ConflictError(f"subscription {subscription_id} belongs to an open stream",
                                field="id")
        return sub, sub.attach_reader()

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        return self._tasks.spawn(coro, name)

    # -- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> MqttProxy:
        self._started = True
        return self

    def end_streams(self) -> None:
        """End every open SSE response now (stopping): a stream left open would hold the
        HTTP listener's graceful shutdown until systemd kills the process."""
        for sub in self._subs.values():
            if isinstance(sub, StreamSubscription):
                sub.mailbox.close()

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
                await self._tasks.wait()
        except TimeoutError:
            log.warning("MQTT proxy did not release its subscriptions within %ss",
                        self.close_timeout)
        for sub in list(self._subs.values()):  # whatever the timeout left behind
            self._subs.pop(sub.id, None)
            if sub.handle is not None:
                self.router.remove(sub.handle)
            await sub.close()
        await self._tasks.cancel()
        if self._http is not None:
            await self._http.aclose()
            self._http = None


