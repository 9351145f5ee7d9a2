"""``MQTTProxy``: the replaced gateway MQTT proxy's Python interface, on ``FleetClient``.

Applications written for the predecessor (``proxies["mqtt"]`` in a Petal-style app
manager) call ``publish_message`` for a ``True``/``False``, register
``async def handler(topic, payload)`` with ``subscribe_to_topic`` and, without ``await``,
``subscribe_pattern``, answer commands with ``send_command_response`` and read
``health_check()["connection"]``. This adapter gives them exactly that against either
service's REST proxy (the edge agent's admin listener, or the callback server), so
such an application moves over by changing its import. ``FleetClient`` keeps its own
contract (one ``InboundMessage`` per call, exceptions for every failure); the seed's
semantics live here and only here. docs/migrating-mqtt-proxy.md maps every name.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any

from bridge.backoff import backoff_delay
from bridge.client import FleetClient, Subscription
from bridge.commands import Response
from bridge.errors import AuthError, FleetError, ServiceError, ServiceUnreachableError
from bridge.transport import InboundMessage

__all__ = ["MQTTProxy", "PatternSubscription", "SeedHandler", "decode_payload"]

log = logging.getLogger(__name__)

#: The predecessor's handler: ``handler(topic, payload)``, payload decoded (see
#: ``decode_payload``); async as in the seed, a plain function works too.
SeedHandler = Callable[[str, Any], Awaitable[None] | None]


def decode_payload(payload: bytes) -> Any:
    """JSON decoded (a dict for an envelope or command), else the UTF-8 text, else the
    bytes as they came (a binary payload is no text)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload
    try:
        return json.loads(text)
    except ValueError:
        return text


def _adapt(handler: SeedHandler) -> Callable[[InboundMessage], Awaitable[None]]:
    """The seed's ``(topic, payload)`` handler as a FleetClient handler."""

    async def call(message: InboundMessage) -> None:
        result = handler(message.topic, decode_payload(message.payload))
        if inspect.isawaitable(result):
            await result

    return call


class PatternSubscription:
    """What ``subscribe_pattern`` returns: registered at once, subscribing in the
    background. Awaiting it is optional (the seed did not); it then gives True once the
    service holds the subscription (messages are kept for it from then on), False when
    the service refused it (the reason is logged and in ``error``); a wrong token raises
    AuthError there, as every call does."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._task: asyncio.Task[Subscription | None] | None = None
        #: Why it was refused or failed (None while pending or once subscribed).
        self.error: str | None = None

    @property
    def subscribed(self) -> bool:
        """True once the service holds it."""
        task = self._task
        return (task is not None and task.done() and not task.cancelled()
                and task.exception() is None and task.result() is not None)

    async def _wait(self) -> bool:
        assert self._task is not None
        return await asyncio.shield(self._task) is not None

    def __await__(self) -> Generator[Any, None, bool]:
        return self._wait().__await__()


class MQTTProxy:
    """The predecessor's in-app MQTT interface over a service's REST MQTT proxy.

    ``MQTTProxy(base_url, token)`` makes its own FleetClient (extra keyword arguments go
    to it); ``MQTTProxy(client=...)`` wraps one you have. An async context manager:
    leaving it ends every subscription. Failures the service answers (a refused topic,
    the broker away, no PUBACK) are ``False`` and logged, as in the seed; not reaching the
    service at all raises ``ServiceUnreachableError``, and a wrong token ``AuthError``
    (every later call would fail the same way).
    """

    def __init__(self, base_url: str | None = None, token: str | None = None, *,
                 client: FleetClient | None = None, **client_options: Any) -> None:
        if client is None:
            if base_url is None:
                raise TypeError("MQTTProxy needs base_url (and token) or client=")
            client = FleetClient(base_url, token, **client_options)
        self.client = client
        #: Background subscribes still running, with their patterns (health_check).
        self._pending: dict[asyncio.Task[Subscription | None], str] = {}
        #: Patterns the service refused (kept for health_check: an app bug to see).
        self._refused_patterns: list[PatternSubscription] = []
        #: The reason of the last publish or subscribe that answered False.
        self.last_error: str | None = None

    async def __aenter__(self) -> MQTTProxy:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop pending background subscribes, end every subscription, close."""
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        await self.client.aclose()

    def _refused(self, what: str, exc: FleetError) -> bool:
        """Record and log a failure the service answered; re-raise what the seed raised."""
        if isinstance(exc, ServiceUnreachableError | AuthError):
            raise exc
        self.last_error = str(exc)
        log.warning("%s failed: %s", what, exc)
        return False

    # -- publish --------------------------------------------------------------------------
    async def publish_message(self, topic: str, payload: Any, qos: int = 1,
                              retain: bool = False) -> bool:
        """Publish (a dict as JSON, a str as text, bytes as they are); True once the
        broker acknowledged it (QoS 1), False when the service or broker refused or
        could not deliver it (``last_error`` says why)."""
        try:
            await self.client.publish_message(topic, payload, qos=qos, retain=retain)
        except FleetError as exc:
            return self._refused(f"publish to {topic!r}", exc)
        return True

    async def send_command_response(self, response_topic: str, message_id: str, data: Any,
                                    status: str = "success") -> bool:
        """Answer a command: ``{"messageId", "status", "result"}`` on ``response_topic``
        (``status="error"``: ``{"messageId", "status": "error", "error": data}``)."""
        if status not in ("success", "error"):
            raise ValueError(f"status must be 'success' or 'error', got {status!r}")
        response = (Response(message_id, "success", result=data) if status == "success"
                    else Response(message_id, "error", error=str(data)))
        return await self.publish_message(response_topic, response.to_json(), qos=1)

    # -- subscribe ------------------------------------------------------------------------
    async def subscribe_to_topic(self, topic: str, handler: SeedHandler,
                                 qos: int = 1) -> bool:
        """Call ``handler(topic, payload)`` for each message on ``topic`` (MQTT ``+``/``#``
        allowed), one at a time; True once the service holds the subscription, False if
        it refused it."""
        try:
            await self.client.subscribe_to_topic(topic, _adapt(handler), qos=qos)
        except FleetError as exc:
            return self._refused(f"subscribe to {topic!r}", exc)
        return True

    def subscribe_pattern(self, pattern: str, handler: SeedHandler,
                          qos: int = 1) -> PatternSubscription:
        """As the seed: callable without ``await`` from code running in the event loop.
        ``*`` matches one topic level (``org/*/device/*/telemetry``) or part of one
        (``robot-*``). Registers now and subscribes in the background, retrying while
        the service cannot be reached; awaiting the result waits for that."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # nothing could run the background subscribe: say what to do
            raise RuntimeError(
                f"subscribe_pattern({pattern!r}) needs a running event loop: call it from "
                "async code (a coroutine run by asyncio.run, after MQTTProxy(...) is made "
                "there), as the predecessor's applications did") from None
        handle = PatternSubscription(pattern)
        task = handle._task = loop.create_task(self._subscribe_pattern(handle, handler, qos),
                                               name=f"compat-pattern-{pattern}")
        self._pending[task] = pattern

        def done(task: asyncio.Task[Subscription | None]) -> None:
            self._pending.pop(task, None)
            if not task.cancelled() and task.exception() is not None:
                handle.error = repr(task.exception())
                self._refused_patterns.append(handle)
                log.error("subscribing to pattern %r failed", pattern,
                          exc_info=task.exception())

        task.add_done_callback(done)
        return handle

    async def _subscribe_pattern(self, handle: PatternSubscription, handler: SeedHandler,
                                 qos: int) -> Subscription | None:
        pattern, attempt = handle.pattern, 0
        while True:
            try:
                sub = await self.client.subscribe_pattern(pattern, _adapt(handler), qos=qos)
            except ServiceUnreachableError as exc:
                delay = backoff_delay(attempt, *self.client.reconnect_delays)
                log.info("pattern %r: service unreachable (%s); retrying in %.1f s",
                         pattern, exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            except (AuthError, ServiceError):
                raise  # logged by the done callback: not worth retrying
            except FleetError as exc:  # refused (invalid or foreign pattern)
                self._refused(f"subscribe to pattern {pattern!r}", exc)
                handle.error = str(exc)
                self._refused_patterns.append(handle)
                return None
            return sub

    async def unsubscribe(self, topic: str) -> bool:
        """End this app's subscriptions on ``topic`` (or pattern); True if there were any."""
        return await self.client.unsubscribe(topic) > 0

    # -- status ---------------------------------------------------------------------------
    async def health_check(self) -> dict[str, Any]:
        """The seed's shape: ``status`` and ``connection`` with ``ts_client`` (the
        service's proxy answers), ``callback_server`` (every subscription's message
        stream is open) and ``connected`` (the service's broker connection); also
        ``pending_subscriptions`` (the patterns still subscribing) and
        ``refused_subscriptions``. Never raises, so a monitor can always read it."""
        status: dict[str, Any] = {}
        error, reachable = None, True
        try:
            status = await self.client.health_check()
        except FleetError as exc:
            # Answered, even with a refusal: the seed's client-to-proxy link is up.
            error, reachable = str(exc), not isinstance(exc, ServiceUnreachableError)
        subs = self.client.subscriptions
        streams = all(s.live.is_set() for s in subs)
        connected = bool(status.get("connected"))
        refused = [{"pattern": h.pattern, "error": h.error} for h in self._refused_patterns]
        healthy = (reachable and connected and streams and not self._pending
                   and not refused)
        body: dict[str, Any] = {
            "status": "healthy" if healthy else "unhealthy",
            "connection": {"ts_client": reachable, "callback_server": reachable and streams,
                           "connected": connected},
            "subscriptions": [s.topic for s in subs],
            "pending_subscriptions": sorted(self._pending.values()),
            "refused_subscriptions": refused,
            "service": status,
        }
        if error is not None:
            body["error"] = error
        return body
