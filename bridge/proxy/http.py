"""The REST ``/mqtt/*`` routes; their errors go through bridge.http.error_boundary like every app's.

The routes are module-level functions; ``create_proxy_router`` mounts them for one proxy
and its ``authorize`` hook, which the routes get as the ``Proxy`` and ``Authorize``
dependencies."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, Literal, cast
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    field_validator,
    model_validator,
)

from bridge.errors import AuthError, InputError, NotFoundError
from bridge.http.api_docs import event_stream
from bridge.http.body import parse_model, read_body
from bridge.http.error_boundary import json_body
from bridge.http.keyset import page_of
from bridge.http.paging import DEFAULT_LIMIT, MAX_LIMIT, Text, decode_cursor
from bridge.proxy.core import MqttProxy
from bridge.proxy.sse import EventStream

# -- HTTP ------------------------------------------------------------------------------------
#: What a route that goes to the broker may answer besides 2xx (bridge.http.error_boundary).
_BROKER: dict[int | str, dict[str, Any]] = {
    400: {}, 403: {"description": "Topic outside what the caller may use"}, 413: {},
    502: {}, 503: {"description": "Broker not connected"},
    504: {"description": "No PUBACK/SUBACK in time"}}
#: A subscribing route at the proxy's subscription cap (``max_subscriptions``).
_AT_CAP: dict[str, Any] = {"description": "Too many subscriptions on this proxy"}
#: Unsubscribing by the id of a subscription that is not the REST API's to remove.
_NOT_REST: dict[str, Any] = {"description": "`id` names an open stream's subscription or "
                                            "the application's own"}


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
            url = urlsplit(value)
            url.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.hostname:
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


#: What a REST proxy request does, as an ``authorize`` hook is told.
ProxyAction = Literal["publish", "subscribe", "unsubscribe", "status", "subscriptions", "stream"]
#: ``authorize(request, action, topic)`` raises a FleetError to refuse (``topic``: the topic
#: or filter the request names, None if none); it returns which subscription filters the
#: caller may see, for listings, and a stream asks it again before each message (a key
#: removed since ends the stream).
ProxyAuthorize = Callable[[Request, ProxyAction, str | None], Callable[[str], bool]]


def _sees_all(topic_filter: str) -> bool:
    return True


def bearer_matches(authorization: str, expected: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <expected>``. RFC 7235: the
    scheme is case-insensitive (``bearer`` is ``Bearer``) and required (a bare token is
    refused); the token is compared in constant time, whatever the scheme."""
    scheme, _, value = authorization.partition(" ")
    # Starlette decodes headers as latin-1; re-encoding gives the raw bytes back.
    given = value.strip().encode("latin-1", "replace")
    ok = hmac.compare_digest(given, expected.encode("utf-8"))
    return ok and scheme.lower() == "bearer"


async def _listener_token(request: Request) -> None:
    """The one check of a listener's own token (the edge's ``PROXY_TOKEN``): the router
    that mounts a route puts the token in ``request.state.listener_token`` first (None:
    no token configured, every caller admitted); a route without it is a bug (500),
    never an open door."""
    expected = cast(str | None, request.state.listener_token)
    if expected is not None and not bearer_matches(
            request.headers.get("authorization", ""), expected):
        raise AuthError("missing or invalid bearer token", bearer=True)


#: The caller holds the listener's token (``Authorization: Bearer <token>``, 401 else):
#: the proxy's routes and the edge's ``/pudu/*`` routes, one check for both.
ListenerToken = Annotated[None, Depends(_listener_token)]


#: The ``/mqtt/*`` routes; ``create_proxy_router`` mounts them for one proxy.
routes = APIRouter()


def create_proxy_router(proxy: MqttProxy,
                        authorize: ProxyAuthorize | None = None) -> APIRouter | None:
    """The ``/mqtt/*`` routes, or None when neither a token nor ``authorize`` is given
    (proxy off: mount nothing). Without ``authorize`` the proxy's one token admits a
    caller to everything; with it the hook decides per request (the callback server's
    org-scoped keys)."""
    dependencies: list[Any] = []
    if authorize is None:
        if proxy.token is None:
            return None
        dependencies.append(Depends(_listener_token))
        authorize = _allow_all
    check = authorize

    async def bind(request: Request) -> None:
        """Hand this router's proxy, hook and token to the routes (see ``Proxy``,
        ``Authorize``, ``ListenerToken``)."""
        request.state.mqtt_proxy = proxy
        request.state.mqtt_authorize = check
        request.state.listener_token = proxy.token

    api = APIRouter(prefix="/mqtt", tags=["mqtt"], dependencies=[Depends(bind), *dependencies])
    api.include_router(routes)
    return api


def _allow_all(request: Request, action: ProxyAction, topic: str | None) -> Callable[[str], bool]:
    return _sees_all


async def _proxy(request: Request) -> MqttProxy:
    return cast(MqttProxy, request.state.mqtt_proxy)


async def _authorize(request: Request) -> ProxyAuthorize:
    return cast(ProxyAuthorize, request.state.mqtt_authorize)


#: The proxy whose router the request came through.
Proxy = Annotated[MqttProxy, Depends(_proxy)]
#: That router's ``authorize`` hook (the token-only proxy's admits everything).
Authorize = Annotated[ProxyAuthorize, Depends(_authorize)]


def visible_filter(proxy: MqttProxy, visible: Callable[[str], bool],
                   subscription_id: str) -> str:
    """The filter of a subscription the caller may see; another org's is answered
    exactly like one that does not exist (never confirm it exists)."""
    topic_filter = proxy.subscription_filter(subscription_id)
    if not visible(topic_filter):
        raise NotFoundError(f"no subscription {subscription_id!r}", field="id")
    return topic_filter


def _decoded(body: PublishBody) -> JsonValue | bytes:
    """The payload to publish: a base64 string payload as its bytes."""
    if body.encoding != "base64":
        return body.payload
    if not isinstance(body.payload, str):
        raise InputError("base64 encoding needs a string payload", field="payload")
    try:
        return base64.b64decode(body.payload, validate=True)
    except binascii.Error as exc:
        raise InputError(f"payload is not base64: {exc}", field="payload") from exc


@routes.post("/publish", openapi_extra=json_body(PublishBody), responses=_BROKER)
async def publish(request: Request, proxy: Proxy, check: Authorize) -> dict[str, Any]:
    """Publish and answer after the PUBACK (504 without one, 503 if QoS 0 offline)."""
    body = parse_model(PublishBody, await read_body(request, proxy.max_body))
    check(request, "publish", body.topic)
    size = await proxy.publish_message(body.topic, _decoded(body), body.qos, body.retain)
    return {"status": "success", "topic": body.topic, "qos": body.qos,
            "retain": body.retain, "bytes": size}


@routes.post("/subscribe", openapi_extra=json_body(SubscribeBody),
              responses={**_BROKER, 429: _AT_CAP})
async def subscribe(request: Request, proxy: Proxy, check: Authorize) -> dict[str, Any]:
    """Webhook subscription when ``callback_url`` is given, else a buffered stream."""
    body = parse_model(SubscribeBody, await read_body(request, 64 * 1024))
    check(request, "subscribe", body.topic)
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


@routes.post("/unsubscribe", openapi_extra=json_body(UnsubscribeBody),
              responses={404: {}, 409: _NOT_REST, **_BROKER})
async def unsubscribe(request: Request, proxy: Proxy, check: Authorize) -> dict[str, Any]:
    """Remove REST subscriptions by exact filter, or one by id."""
    body = parse_model(UnsubscribeBody, await read_body(request, 64 * 1024))
    visible = check(request, "unsubscribe", body.topic)  # who the caller is comes first
    if body.id is not None:
        check(request, "unsubscribe", visible_filter(proxy, visible, body.id))
    if body.id is not None:
        await proxy.remove_rest_subscription(body.id)
        removed = [body.id]
    else:
        assert body.topic is not None
        removed = await proxy.remove_rest_subscriptions(body.topic)
        if not removed:
            raise NotFoundError(f"no REST subscription on {body.topic!r}", field="topic")
    return {"status": "success", "removed": removed}


@routes.get("/status")
async def status(request: Request, proxy: Proxy, check: Authorize) -> dict[str, Any]:
    """Connection, counters and identity; ``subscriptions`` counts every one,
    ``subscription_list`` lists those the caller may see (as GET /mqtt/subscriptions)."""
    visible = check(request, "status", None)
    body = proxy.status()
    body["subscription_list"] = sorted(
        (s for s in proxy.subscriptions() if visible(s["filter"])), key=lambda s: s["id"])
    return body


@routes.get("/subscriptions")
async def subscriptions(
    request: Request, proxy: Proxy, check: Authorize,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
) -> dict[str, Any]:
    """The caller's subscriptions by id, a page at a time (never their secrets)."""
    visible = check(request, "subscriptions", None)
    mine = (s for s in proxy.subscriptions() if visible(s["filter"]))
    return page_of(mine, lambda s: [s["id"]], decode_cursor(cursor, Text), limit).body()


@routes.get("/subscriptions/{subscription_id}/deliveries", responses={404: {}})
async def deliveries(request: Request, subscription_id: str, proxy: Proxy,
                     check: Authorize) -> dict[str, Any]:
    """A callback subscription's last attempts (status code, retries), newest first."""
    visible = check(request, "subscriptions", None)
    visible_filter(proxy, visible, subscription_id)
    return {"status": "success", "id": subscription_id,
            "items": proxy.delivery_log(subscription_id)}


@routes.get("/stream", response_class=EventStream, status_code=200,
            responses={**event_stream("Events `message` (one each), `dropped`, `end`"),
                       404: {}, 409: {"description": "`id` names a subscription that "
                                                     "delivers by callback_url, or one "
                                                     "another open stream owns"},
                       429: _AT_CAP, **_BROKER})
async def stream(
    request: Request, proxy: Proxy, check: Authorize,
    topic: Annotated[str | None, Query()] = None,
    subscription_id: Annotated[str | None, Query(alias="id")] = None,
) -> Response:
    """SSE: ``?topic=FILTER`` for a subscription that lives as long as the
    connection, or ``?id=`` to read one made by POST /mqtt/subscribe."""
    if (topic is None) == (subscription_id is None):
        raise InputError("give exactly one of topic or id", field="topic")
    visible = check(request, "stream", topic)  # who the caller is comes first
    if subscription_id is not None:
        check(request, "stream", visible_filter(proxy, visible, subscription_id))
    if topic is not None:
        sub, reader = await proxy.open_stream(topic)
        on_close: Callable[[], None] = partial(proxy.discard, sub)
    else:
        assert subscription_id is not None
        sub, reader = proxy.attach_reader(subscription_id)
        on_close = partial(sub.detach_reader, reader)
    return EventStream(sub, reader, proxy.keepalive_seconds, on_close,
                       allowed=partial(visible, sub.filter))
