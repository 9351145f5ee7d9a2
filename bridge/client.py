"""``FleetClient``: the REST MQTT proxy (edge agent or callback server) from Python.

Publishing is one POST. A subscription is a buffered one on the service
(``POST /mqtt/subscribe``) read over ``GET /mqtt/stream?id=``; when the stream is cut the
client reconnects with jittered back-off to the same id (the service kept the messages),
and when the service no longer knows the id (it restarted) it subscribes again, so the
handler registrations outlive both. Each subscription's handler is awaited one message
at a time, in the order the stream delivers them. HTTP and httpx errors become the
project's exception tree (bridge.errors) here, and only here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fnmatch
import json
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from bridge.backoff import backoff_delay
from bridge.commands import Response
from bridge.errors import (
    AuthError,
    BodyTooLargeError,
    CommandTimeoutError,
    ConflictError,
    FleetError,
    ForbiddenError,
    InputError,
    MalformedBodyError,
    NotConnectedError,
    NotFoundError,
    PayloadError,
    PubackTimeoutError,
    RateLimitedError,
    ServiceError,
    ServiceUnreachableError,
)
from bridge.topic import TopicFilter
from bridge.transport import InboundMessage

__all__ = ["FleetClient", "Handler", "Subscription", "mqtt_filter"]

# A refusal the service answered, as the class its status_for chose the status from; any
# other 4xx is a ServiceError that keeps the status it came with.
_REFUSED: dict[int, type[InputError]] = {
    400: MalformedBodyError, 403: ForbiddenError, 409: ConflictError,
    413: BodyTooLargeError, 422: InputError, 429: RateLimitedError,
}

log = logging.getLogger(__name__)

#: A subscription's handler: awaited once per message, one at a time.
Handler = Callable[[InboundMessage], Awaitable[None]]

_MESSAGE_ID = re.compile(r"messageId ([A-Za-z0-9_.:-]+)")


def mqtt_filter(pattern: str) -> tuple[str, Callable[[str], bool] | None]:
    """``(filter, local_match)`` for an MQTT filter or a glob pattern.

    A level that is exactly ``*`` becomes ``+`` (one level, as in the interface this
    replaces). A level with ``*`` among other characters (``robot-*``) cannot be an MQTT
    filter: it subscribes as ``+`` and ``local_match`` keeps only the topics whose level
    matches the glob. Raises TopicError for what MQTT would refuse.
    """
    levels = pattern.split("/")
    globbed = [lvl for lvl in levels if "*" in lvl and lvl != "*"]
    flt = "/".join("+" if "*" in lvl else lvl for lvl in levels)
    TopicFilter(flt)  # validates (wildcard placement, length, NUL)
    if not globbed:
        return flt, None

    def match(topic: str) -> bool:
        parts = topic.split("/")
        if "#" not in levels and len(parts) != len(levels):
            return False
        return all(fnmatch.fnmatchcase(part, lvl)
                   for part, lvl in zip(parts, levels, strict=False)
                   if "*" in lvl and lvl != "*")

    return flt, match


@dataclass(eq=False)
class Subscription:
    """One subscription of a FleetClient; ``id`` changes when it is made again."""

    topic: str
    filter: str
    handler: Handler
    qos: int = 1
    match: Callable[[str], bool] | None = None
    id: str | None = None
    #: Messages handed to the handler, stream (re)connections, handler failures.
    delivered: int = 0
    connects: int = 0
    handler_errors: int = 0
    #: Set while the stream is open (after its ``subscribed`` event).
    live: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    #: Set by unsubscribe: the stream loop ends at its next step (a handler may be the
    #: one unsubscribing, and a task cannot cancel and await itself).
    ended: bool = False


class FleetClient:
    """An async client of a service's REST MQTT proxy and command API.

    ``base_url``: the edge agent's admin listener or the callback server; ``token``: the
    ``PROXY_TOKEN`` or an org-scoped key (both are sent as a bearer token). Use it as an
    async context manager; leaving it ends every subscription.
    """

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0,
                 reconnect_min: float = 0.2, reconnect_max: float = 30.0,
                 stream_idle_timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                       timeout=timeout, transport=transport)
        self._reconnect = (reconnect_min, reconnect_max)
        # The service sends a keepalive comment every 15 s: silence longer than this
        # means a dead connection (a NAT or proxy dropped it without a reset).
        self._idle = stream_idle_timeout
        self._subs: list[Subscription] = []
        self._closed = False

    async def __aenter__(self) -> FleetClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End every subscription (also on the service, best effort) and the connection."""
        self._closed = True
        for sub in list(self._subs):
            with contextlib.suppress(FleetError):
                await self.unsubscribe(sub)
        await self._http.aclose()

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)

    @property
    def reconnect_delays(self) -> tuple[float, float]:
        """(first, longest) wait between reconnects, for callers retrying alongside."""
        return self._reconnect

    # -- requests --------------------------------------------------------------------------
    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       wait: float | None = None) -> httpx.Response:
        try:
            extra: dict[str, Any] = {} if wait is None else {"timeout": wait}
            response = await self._http.request(method, path, json=json_body, **extra)
        except httpx.TimeoutException as exc:
            raise ServiceUnreachableError(f"{method} {path}: no answer in time ({exc!r})") from exc
        except httpx.HTTPError as exc:
            raise ServiceUnreachableError(f"{method} {path}: {exc!r}") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response

    async def publish_message(self, topic: str, payload: Any, qos: int = 1,
                              retain: bool = False) -> dict[str, Any]:
        """Publish; returns after the broker's PUBACK (QoS 1/2). ``payload``: ``bytes``
        are sent as they are, a ``str`` as UTF-8, anything else as JSON."""
        body: dict[str, Any] = {"topic": topic, "payload": payload, "qos": qos,
                                "retain": retain}
        if isinstance(payload, bytes | bytearray):
            body["payload"] = base64.b64encode(payload).decode("ascii")
            body["encoding"] = "base64"
        return _json(await self._request("POST", "/mqtt/publish", json_body=body))

    async def health_check(self) -> dict[str, Any]:
        """The proxy's status (``GET /mqtt/status``): broker connection, subscriptions."""
        return _json(await self._request("GET", "/mqtt/status"))

    async def send_command(self, device_id: str, command: str,
                           args: dict[str, Any] | None = None,
                           timeout: float = 10.0,  # noqa: ASYNC109 -- the gateway's, sent on
                           *, org_id: str | None = None) -> Response:
        """Send a command to a gateway through the callback server and wait for the
        response (``status`` "success" or "error"); CommandTimeoutError if none came."""
        body: dict[str, Any] = {"command": command, "args": args or {}, "timeout": timeout}
        if org_id is not None:
            body["org_id"] = org_id
        try:
            response = await self._request("POST", f"/devices/{device_id}/commands",
                                           json_body=body, wait=timeout + 10)
        except ServiceError as exc:
            if exc.status != 504:
                raise
            found = _MESSAGE_ID.search(exc.message)
            raise CommandTimeoutError(device_id, timeout,
                                      found.group(1) if found else "") from None
        try:
            return Response.from_json(response.content)
        except PayloadError as exc:
            raise ServiceError(f"POST {response.request.url.path}: answered "
                               f"{response.status_code} with no command response: {exc}",
                               status=response.status_code) from None

    # -- subscriptions -----------------------------------------------------------------------
    async def subscribe_to_topic(self, topic: str, handler: Handler,
                                 qos: int = 1) -> Subscription:
        """Subscribe to an MQTT topic or filter (``+``/``#``); ``handler`` is awaited for
        each message, one at a time. Returns once the service holds the subscription."""
        return await self._subscribe(topic, topic, None, handler, qos)

    async def subscribe_pattern(self, pattern: str, handler: Handler,
                                qos: int = 1) -> Subscription:
        """As subscribe_to_topic, with ``*`` as a one-level glob (``org/*/device/*/status``,
        ``org/acme/device/robot-*/status``)."""
        flt, match = mqtt_filter(pattern)
        return await self._subscribe(pattern, flt, match, handler, qos)

    async def _subscribe(self, topic: str, flt: str, match: Callable[[str], bool] | None,
                         handler: Handler, qos: int) -> Subscription:
        if self._closed:
            raise ServiceError("the client is closed")
        TopicFilter(flt)
        sub = Subscription(topic=topic, filter=flt, handler=handler, qos=qos, match=match)
        await self._create(sub)
        self._subs.append(sub)
        sub.task = asyncio.get_running_loop().create_task(self._run(sub),
                                                          name=f"fleet-sub-{flt}")
        return sub

    async def _create(self, sub: Subscription) -> None:
        response = await self._request("POST", "/mqtt/subscribe",
                                       json_body={"topic": sub.filter, "qos": sub.qos})
        answer = _json(response)
        if not isinstance(answer.get("id"), str):
            raise ServiceError("POST /mqtt/subscribe: the answer has no subscription id",
                               status=response.status_code)
        sub.id = answer["id"]

    async def unsubscribe(self, target: Subscription | str) -> int:
        """End a subscription, or every one of this client on a topic/pattern; returns
        how many ended."""
        subs = [target] if isinstance(target, Subscription) else [
            s for s in self._subs if target in (s.topic, s.filter)]
        for sub in subs:
            sub.ended = True
            if sub in self._subs:
                self._subs.remove(sub)
            if sub.task is not None and sub.task is not asyncio.current_task():
                sub.task.cancel()
                await asyncio.gather(sub.task, return_exceptions=True)
            # else: called from this subscription's own handler; its loop sees `ended`
            # once the handler returns, and the unsubscribe below ends the stream.
            if sub.id is not None:
                with contextlib.suppress(NotFoundError):
                    await self._request("POST", "/mqtt/unsubscribe", json_body={"id": sub.id})
        return len(subs)

    async def _run(self, sub: Subscription) -> None:
        """Read the stream until unsubscribed: reconnect, and re-subscribe if forgotten."""
        attempt = 0
        while not sub.ended:
            connects = sub.connects
            try:
                if sub.id is None:
                    await self._create(sub)
                async with contextlib.aclosing(self._stream(sub)) as messages:
                    async for message in messages:
                        await self._deliver(sub, message)
                        if sub.ended:
                            return
            except NotFoundError:
                log.info("subscription %s on %s was forgotten (service restarted?); "
                         "subscribing again", sub.id, sub.filter)
                sub.id = None
            except (FleetError, httpx.HTTPError) as exc:
                log.info("stream of %s cut: %s", sub.filter, exc)
            except Exception:  # whatever it was, the subscription must outlive it
                log.exception("stream of %s failed; reconnecting", sub.filter)
            sub.live.clear()
            if sub.ended:
                return
            # A stream that got as far as its `subscribed` event starts the back-off over.
            attempt = 0 if sub.connects > connects else attempt + 1
            await asyncio.sleep(backoff_delay(attempt, *self._reconnect))

    async def _deliver(self, sub: Subscription, message: InboundMessage) -> None:
        if sub.match is not None and not sub.match(message.topic):
            return
        sub.delivered += 1
        try:
            await sub.handler(message)
        except Exception:  # one bad message must not end the subscription
            sub.handler_errors += 1
            log.exception("handler of %s failed on a message from %s", sub.topic,
                          message.topic)

    async def _stream(self, sub: Subscription) -> AsyncGenerator[InboundMessage, None]:
        """The SSE events of ``sub``'s stream as messages; ends when the stream does."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=self._idle)
        try:
            async with self._http.stream("GET", "/mqtt/stream", params={"id": sub.id},
                                         timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error(response)
                event, data = "message", list[str]()
                async for line in response.aiter_lines():
                    if line == "":
                        if data:
                            message = self._event(sub, event, "\n".join(data))
                            if message is not None:
                                yield message
                        event, data = "message", list[str]()
                    elif line.startswith(":"):
                        continue  # keepalive comment
                    else:
                        name, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        if name == "event":
                            event = value
                        elif name == "data":
                            data.append(value)
        except httpx.HTTPError as exc:
            raise ServiceUnreachableError(f"stream {sub.id}: {exc!r}") from exc

    def _event(self, sub: Subscription, event: str, data: str) -> InboundMessage | None:
        """The message an SSE event carries, if any; a malformed one is logged and
        skipped (it must not cost the messages after it)."""
        if event == "subscribed":
            sub.connects += 1
            sub.live.set()
            return None
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            log.warning("skipping a %r event of %s whose data is not a JSON object: %.200r",
                        event, sub.filter, data)
            return None
        if event == "dropped":
            log.warning("the service dropped messages of %s (slow reader): %s in all",
                        sub.filter, obj.get("dropped"))
        elif event == "message":
            topic, text, qos = obj.get("topic"), obj.get("payload"), obj.get("qos", 0)
            try:
                if not isinstance(topic, str) or not isinstance(text, str):
                    raise ValueError("needs a string topic and payload")
                payload = (base64.b64decode(text, validate=True)
                           if obj.get("encoding") == "base64" else text.encode("utf-8"))
            except (ValueError, binascii.Error) as exc:
                log.warning("skipping a malformed message of %s: %s: %.200r", sub.filter,
                            exc, data)
                return None
            return InboundMessage(topic=topic, payload=payload,
                                  qos=qos if qos in (0, 1, 2) else 0,
                                  retain=obj.get("retain") is True)
        return None


def _json(response: httpx.Response) -> dict[str, Any]:
    """A success answer's JSON object; ServiceError if the body is not one (a proxy or
    something else answered in the service's place)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ServiceError(f"{response.request.method} {response.request.url.path}: "
                           f"answered {response.status_code} without a JSON object",
                           status=response.status_code)
    return body


def _error(response: httpx.Response) -> FleetError:
    """The exception for an error answer (the services' one body: status, message, field)."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("message") or body.get("detail") or response.reason_phrase)
    fld = body.get("field")
    where = f"{response.request.method} {response.request.url.path}"
    if status == 401:
        return AuthError(f"{where}: {message}", bearer=True)
    if status == 404:
        return NotFoundError(f"{where}: {message}")
    if status == 503:
        return NotConnectedError(f"{where}: {message}")
    if status == 504 and response.request.url.path == "/mqtt/publish":
        return PubackTimeoutError(f"{where}: {message}")
    kind = _REFUSED.get(status)
    if kind is not None:
        return kind(f"{where}: {message}", field=fld if isinstance(fld, str) else None)
    return ServiceError(f"{where}: {status} {message}", status=status)
