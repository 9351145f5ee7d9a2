"""The REST MQTT proxy against the real Mosquitto on 127.0.0.1:1883."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import uvicorn
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.errors import (
    InputError,
    PayloadTooLargeError,
    TopicError,
    TopicNotAllowedError,
)
from bridge.http.error_boundary import install as install_error_handlers
from bridge.http.error_boundary import status_for
from bridge.http.outbound import OutboundPolicy
from bridge.proxy import MqttProxy, RetryPolicy, create_proxy_router, sign
from bridge.proxy.subscriptions import Mailbox
from bridge.router import MessageRouter
from bridge.transport import MqttSettings
from bridge.transport.paho import PahoTransport

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
TOKEN = "test-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- helpers ------------------------------------------------------------------------------
class PahoClient:
    """A plain paho client (not our transport): what an outside MQTT user does."""

    def __init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"t-plain-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.messages: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()

    async def __aenter__(self) -> PahoClient:
        loop = asyncio.get_running_loop()
        connected = asyncio.Event()

        def on_connect(*args: Any) -> None:
            loop.call_soon_threadsafe(connected.set)

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            loop.call_soon_threadsafe(self.messages.put_nowait, msg)

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", 1883, 30)
        self.client.loop_start()
        await asyncio.wait_for(connected.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    async def subscribe(self, topic_filter: str) -> None:
        loop = asyncio.get_running_loop()
        granted = asyncio.Event()

        def on_subscribe(*args: Any) -> None:
            loop.call_soon_threadsafe(granted.set)

        self.client.on_subscribe = on_subscribe
        rc, _ = self.client.subscribe(topic_filter, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        await asyncio.wait_for(granted.wait(), 5)

    async def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        await asyncio.to_thread(info.wait_for_publish, 5)


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under a real uvicorn on a free port (httpx's ASGITransport buffers
    whole responses, so it cannot show a stream). The socket is bound and listening
    before we yield: connections wait in the backlog, no readiness polling needed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, lifespan="off", access_log=False,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn-{port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """Parse a text/event-stream into (event, data-as-JSON); comments are skipped."""
    event, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif line == "" and data:
            yield event, json.loads(data)
            event, data = "message", ""


@dataclass
class Env:
    base: str
    transport: PahoTransport
    router: MessageRouter
    proxy: MqttProxy
    app: FastAPI
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def running_proxy(role: str, **policy: Any) -> AsyncIterator[Env]:
    """A proxy on a paho connection of its own, allowed a fresh prefix, its routes in an
    app, and a client with the token; ``policy``: MqttProxy's keyword arguments."""
    base = f"test/{uuid.uuid4().hex}/"
    settings = MqttSettings.from_url(BROKER, client_id=f"t-{role}-{uuid.uuid4().hex[:8]}",
                                     clean_start=True)
    transport = PahoTransport(settings)
    async with transport:
        await asyncio.wait_for(transport.wait_connected(), 5)
        router = MessageRouter(transport)
        proxy = MqttProxy(transport, router, token=TOKEN, allowed_prefixes=[base], **policy)
        async with router, proxy:
            app = FastAPI()
            install_error_handlers(app)
            api = create_proxy_router(proxy)
            assert api is not None
            app.include_router(api)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://proxy", headers=AUTH) as client:
                yield Env(base, transport, router, proxy, app, client)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    # The webhook receivers of these tests listen on loopback: the operator allows it.
    async with running_proxy("proxy", retry=RetryPolicy(base=0.05, cap=0.2),
                             keepalive_seconds=0.2,
                             outbound=OutboundPolicy(allow=("127.0.0.1/32",))) as running:
        yield running


# -- auth and mounting ----------------------------------------------------------------------
async def test_token_is_required(env: Env) -> None:
    anonymous = httpx.AsyncClient(transport=httpx.ASGITransport(app=env.app),
                                  base_url="http://proxy")
    async with anonymous:
        assert (await anonymous.get("/mqtt/status")).status_code == 401
        wrong = await anonymous.get("/mqtt/status", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"
        basic = await anonymous.get("/mqtt/status", headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code == 401
        # auth is checked before the body is even read
        bad_body = await anonymous.post("/mqtt/publish", content=b"not json")
        assert bad_body.status_code == 401
        assert (await anonymous.get("/mqtt/subscriptions")).status_code == 401
        assert (await anonymous.get("/mqtt/stream", params={"topic": "x"})).status_code == 401
    ok = await env.client.get("/mqtt/status")
    assert ok.status_code == 200


async def test_no_token_means_no_router() -> None:
    transport = PahoTransport(MqttSettings.from_url(BROKER, client_id="t-unused"))
    router = MessageRouter(transport)
    assert create_proxy_router(MqttProxy(transport, router, token=None,
                                         allowed_prefixes=["x/"])) is None
    assert create_proxy_router(MqttProxy(transport, router, token="",
                                         allowed_prefixes=["x/"])) is None


# -- publish -------------------------------------------------------------------------------
async def test_publish_is_seen_by_a_real_subscriber(env: Env) -> None:
    async with PahoClient() as outside:
        await outside.subscribe(env.base + "#")
        r = await env.client.post("/mqtt/publish", json={
            "topic": env.base + "cmd/1", "payload": {"x": 1, "s": "ü"}, "qos": 1})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "success" and body["topic"] == env.base + "cmd/1"
        msg = await asyncio.wait_for(outside.messages.get(), 5)
        assert msg.topic == env.base + "cmd/1"
        assert json.loads(msg.payload) == {"x": 1, "s": "ü"}

        r = await env.client.post("/mqtt/publish", json={
            "topic": env.base + "raw", "payload": "plain text", "qos": 0})
        assert r.status_code == 200, r.text
        msg = await asyncio.wait_for(outside.messages.get(), 5)
        assert msg.payload == b"plain text" and msg.qos == 0

        r = await env.client.post("/mqtt/publish", json={
            "topic": env.base + "bin", "payload": base64.b64encode(b"\x00\xff").decode(),
            "encoding": "base64"})
        assert r.status_code == 200, r.text
        msg = await asyncio.wait_for(outside.messages.get(), 5)
        assert msg.payload == b"\x00\xff"
    status = (await env.client.get("/mqtt/status")).json()
    assert status["published"] == 3 and status["connected"] is True
    assert status["broker"] == "127.0.0.1:1883"


async def test_refused_topics_and_filters(env: Env) -> None:
    async def publish(topic: str, **extra: Any) -> httpx.Response:
        return await env.client.post("/mqtt/publish",
                                     json={"topic": topic, "payload": "x", **extra})

    dollar = await publish("$SYS/x")
    assert dollar.status_code == 403
    assert "reserved for the broker" in dollar.json()["message"]
    assert (await publish("other/place")).status_code == 403
    assert (await publish(env.base + "a/+")).status_code == 422  # wildcard in a topic name
    assert (await publish(env.base + "a", qos=3)).status_code == 422
    assert (await publish(env.base + "a", retain="yes")).status_code == 422
    missing = await env.client.post("/mqtt/publish", json={"topic": env.base + "a"})
    assert missing.status_code == 422 and missing.json()["field"] == "payload"

    async def subscribe(topic: str) -> httpx.Response:
        return await env.client.post("/mqtt/subscribe", json={"topic": topic})

    assert (await subscribe("$SYS/#")).status_code == 403
    assert (await subscribe("$share/g/$SYS/#")).status_code == 403
    assert (await subscribe(f"$share/g/{env.base}#")).status_code == 403  # inside, but shared
    assert (await subscribe("#")).status_code == 403
    assert (await subscribe("test/+/x")).status_code == 403  # could match other prefixes
    assert (await subscribe(env.base + "a#")).status_code == 422
    assert (await subscribe(env.base + "#/b")).status_code == 422
    stream = await env.client.get("/mqtt/stream", params={"topic": "$SYS/#"})
    assert stream.status_code == 403
    assert env.router.filters() == {}

    with pytest.raises(TopicNotAllowedError):
        await env.proxy.publish_message("$SYS/x", b"x")
    with pytest.raises(TopicError):
        await env.proxy.publish_message(env.base + "#", b"x")


async def test_payload_limits(env: Env) -> None:
    limit = env.proxy.max_payload
    ok = await env.client.post("/mqtt/publish",
                               json={"topic": env.base + "big", "payload": "x" * limit})
    assert ok.status_code == 200, ok.text
    over = await env.client.post("/mqtt/publish",
                                 json={"topic": env.base + "big", "payload": "x" * (limit + 1)})
    assert over.status_code == 413
    assert "exceeds the limit" in over.json()["message"]
    huge = await env.client.post("/mqtt/publish", content=b"[" + b" " * env.proxy.max_body)
    assert huge.status_code == 413
    with pytest.raises(PayloadTooLargeError):
        await env.proxy.publish_message(env.base + "big", b"x" * (limit + 1))


async def test_qos_capped_by_the_backend() -> None:
    transport = PahoTransport(MqttSettings.from_url(BROKER, client_id="t-unused"))
    proxy = MqttProxy(transport, MessageRouter(transport), token=TOKEN,
                      allowed_prefixes=["x/"], max_qos=1)
    assert proxy.check_qos(1) == 1
    with pytest.raises(InputError) as info:
        proxy.check_qos(2)
    assert info.value.field == "qos" and status_for(info.value) == 422


async def test_offline_publish_503_for_qos0_and_504_without_puback() -> None:
    # Never started: no broker connection at all.
    transport = PahoTransport(MqttSettings.from_url(BROKER, client_id="t-offline"))
    router = MessageRouter(transport)
    proxy = MqttProxy(transport, router, token=TOKEN, allowed_prefixes=["x/"],
                      publish_timeout=0.2)
    app = FastAPI()
    install_error_handlers(app)
    api = create_proxy_router(proxy)
    assert api is not None
    app.include_router(api)
    async with proxy, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                        base_url="http://proxy", headers=AUTH) as client:
        r0 = await client.post("/mqtt/publish", json={"topic": "x/a", "payload": "p", "qos": 0})
        assert r0.status_code == 503
        assert r0.json()["status"] == "error" and r0.headers["Retry-After"] == "5"
        r1 = await client.post("/mqtt/publish", json={"topic": "x/a", "payload": "p", "qos": 1})
        assert r1.status_code == 504
        assert "may be delivered later" in r1.json()["message"]
        status = (await client.get("/mqtt/status")).json()
        assert status["connected"] is False and status["publish_errors"] == 2


# -- subscribe: streams ----------------------------------------------------------------------
async def test_stream_receives_messages_from_a_real_client(env: Env) -> None:
    released = asyncio.Event()
    real_unsubscribe = env.transport.unsubscribe

    async def unsubscribe(topic_filter: str) -> None:
        await real_unsubscribe(topic_filter)
        if topic_filter == env.base + "sse/#":
            released.set()

    env.transport.unsubscribe = unsubscribe  # type: ignore[method-assign]
    async with serve(env.app) as url, \
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as http, \
            PahoClient() as outside:
        async with http.stream("GET", "/mqtt/stream",
                               params={"topic": env.base + "sse/#"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
            kind, hello = await asyncio.wait_for(anext(events), 5)
            assert kind == "subscribed" and hello["topic"] == env.base + "sse/#"
            assert env.router.filters() == {env.base + "sse/#": 1}

            await outside.publish(env.base + "sse/1", b'{"hello": "world"}')
            await outside.publish(env.base + "sse/2", b"\xff\x00binary")
            await outside.publish(env.base + "other", b"not for this stream")
            kind, first = await asyncio.wait_for(anext(events), 5)
            assert kind == "message"
            assert first == {"topic": env.base + "sse/1", "payload": '{"hello": "world"}',
                             "encoding": "utf-8", "qos": 1, "retain": False}
            kind, second = await asyncio.wait_for(anext(events), 5)
            assert second["encoding"] == "base64"
            assert base64.b64decode(second["payload"]) == b"\xff\x00binary"
            listed = (await env.client.get("/mqtt/subscriptions")).json()["items"]
            assert [(s["kind"], s["owner"], s["delivered"]) for s in listed] == [
                ("stream", "stream", 2)]
            await outside.publish(env.base + "sse/3", b"third")
            kind, third = await asyncio.wait_for(anext(events), 5)
            assert third["payload"] == "third"  # "other" (published before it) never came
        # The client went away: the proxy lets go of the broker subscription.
        await asyncio.wait_for(released.wait(), 5)
    assert env.router.filters() == {}
    assert env.proxy.subscriptions() == []
    assert env.router.routes == 0


async def test_stream_sends_keepalives(env: Env) -> None:
    comments: list[str] = []
    async with serve(env.app) as url, \
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as http, \
            http.stream("GET", "/mqtt/stream", params={"topic": env.base + "k"}) as response:
        lines = response.aiter_lines()
        while ": keepalive" not in comments:
            line = await asyncio.wait_for(anext(lines), 5)
            if line.startswith(":"):
                comments.append(line)


async def test_post_subscribe_buffers_until_a_reader_comes(env: Env) -> None:
    r = await env.client.post("/mqtt/subscribe", json={"topic": env.base + "buf/+"})
    assert r.status_code == 200, r.text
    sub_id = r.json()["id"]
    assert r.json()["stream"] == f"/mqtt/stream?id={sub_id}"
    assert "secret" not in r.json()
    arrived = asyncio.Event()
    env.router.add(env.base + "buf/+", lambda m: arrived.set())  # same dispatch as the proxy's

    async with PahoClient() as outside:
        await outside.publish(env.base + "buf/1", b"queued while nobody reads")
        await asyncio.wait_for(arrived.wait(), 5)
    listed = (await env.client.get("/mqtt/subscriptions")).json()["items"]
    assert listed[0]["pending"] == 1 and listed[0]["reader_attached"] is False

    async with serve(env.app) as url, \
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as http, \
            http.stream("GET", "/mqtt/stream", params={"id": sub_id}) as response:
        events = sse_events(response)
        assert (await asyncio.wait_for(anext(events), 5))[0] == "subscribed"
        assert await asyncio.wait_for(anext(events), 5) == ("message", {
            "topic": env.base + "buf/1", "payload": "queued while nobody reads",
            "encoding": "utf-8", "qos": 1, "retain": False})
        # The client reconnects while the service still holds its old connection (a
        # half-open one it has not noticed): the new reader takes over, the old one ends,
        # and what arrives next goes to the new one.
        async with http.stream("GET", "/mqtt/stream", params={"id": sub_id}) as again:
            assert again.status_code == 200
            newer = sse_events(again)
            assert (await asyncio.wait_for(anext(newer), 5))[0] == "subscribed"
            assert [e async for e in events] == []  # the replaced reader ended
            async with PahoClient() as outside:
                await outside.publish(env.base + "buf/2", b"after the reconnect")
            kind, message = await asyncio.wait_for(anext(newer), 5)
            assert (kind, message["payload"]) == ("message", "after the reconnect")
            gone = await env.client.post("/mqtt/unsubscribe", json={"id": sub_id})
            assert gone.status_code == 200 and gone.json()["removed"] == [sub_id]
            # unsubscribing ends the stream
            assert [e async for e in newer] == []
    assert env.router.filters() == {}
    again = await env.client.post("/mqtt/unsubscribe", json={"id": sub_id})
    assert again.status_code == 404


async def test_unsubscribe_by_topic(env: Env) -> None:
    ids = []
    for _ in range(2):
        r = await env.client.post("/mqtt/subscribe", json={"topic": env.base + "u/#"})
        ids.append(r.json()["id"])
    assert env.router.filters() == {env.base + "u/#": 2}  # one broker subscription, 2 refs
    r = await env.client.post("/mqtt/unsubscribe", json={"topic": env.base + "u/#"})
    assert r.status_code == 200 and sorted(r.json()["removed"]) == sorted(ids)
    assert env.router.filters() == {}
    assert (await env.client.post("/mqtt/unsubscribe",
                                  json={"topic": env.base + "u/#"})).status_code == 404
    both = await env.client.post("/mqtt/unsubscribe", json={"topic": "a", "id": "b"})
    assert both.status_code == 422


# -- subscribe: webhooks ---------------------------------------------------------------------
async def test_callback_is_signed_and_retried(env: Env) -> None:
    received: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
    answers = iter([500])  # first attempt fails, then 200

    async def hook(request: Request) -> Response:
        await received.put((await request.body(), dict(request.headers)))
        return Response(status_code=next(answers, 200))

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serve(receiver) as url, PahoClient() as outside:
        r = await env.client.post("/mqtt/subscribe", json={
            "topic": env.base + "cb/#", "callback_url": f"{url}/hook"})
        assert r.status_code == 200, r.text
        sub_id, secret = r.json()["id"], r.json()["secret"]
        assert len(secret) == 64

        await outside.publish(env.base + "cb/robot1", b'{"battery": 80}')
        first_body, _ = await asyncio.wait_for(received.get(), 5)
        body, headers = await asyncio.wait_for(received.get(), 5)  # the retry
        assert body == first_body  # same delivery, same bytes, same delivery_id
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-signature"], expected)
        assert headers["x-signature"] == sign(secret, body)
        assert headers["x-subscription-id"] == sub_id
        doc = json.loads(body)
        assert doc["topic"] == env.base + "cb/robot1"
        assert doc["payload"] == '{"battery": 80}' and doc["encoding"] == "utf-8"
        assert doc["qos"] == 1 and doc["retain"] is False
        assert isinstance(doc["received_at"], float)

        await asyncio.wait_for(env.proxy.flush(), 5)  # the worker has recorded the 200
        r = await env.client.get("/mqtt/subscriptions")
        assert secret not in r.text
        (listed,) = r.json()["items"]
        assert "secret" not in listed
        assert listed["id"] == sub_id and listed["callback_url"] == f"{url}/hook"
        assert listed["delivered"] == 1 and listed["failed"] == 0
        assert listed["failed_attempts"] == 1
        assert listed["delivery"] == "delivering"  # the retry got through
        assert "last_error" not in listed and "HTTP" not in r.text  # no remote status shown
        assert listed["pending"] == 0
        assert received.empty()


async def test_callback_delivery_log_shows_each_retry(env: Env) -> None:
    received: asyncio.Queue[bytes] = asyncio.Queue()
    answers = iter([500, 500])  # two failures, then 200

    async def hook(request: Request) -> Response:
        await received.put(await request.body())
        return Response(status_code=next(answers, 200))

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serve(receiver) as url, PahoClient() as outside:
        r = await env.client.post("/mqtt/subscribe", json={
            "topic": env.base + "log/#", "callback_url": f"{url}/hook"})
        sub_id = r.json()["id"]
        await outside.publish(env.base + "log/robot1", b'{"battery": 70}')
        for _ in range(3):
            await asyncio.wait_for(received.get(), 10)
        await asyncio.wait_for(env.proxy.flush(), 10)
        r = await env.client.get(f"/mqtt/subscriptions/{sub_id}/deliveries")
        assert r.status_code == 200, r.text
        items = r.json()["items"]  # newest first
        assert [(i["attempt"], i["status_code"], i["outcome"]) for i in items] == [
            (3, 200, "delivered"), (2, 500, "failed"), (1, 500, "failed")]
        assert len({i["delivery_id"] for i in items}) == 1  # one delivery, retried
        r = await env.client.get("/mqtt/subscriptions/nope/deliveries")
        assert r.status_code == 404 and r.json()["status"] == "error"


async def test_callback_gives_up_after_bounded_attempts(env: Env) -> None:
    calls: asyncio.Queue[None] = asyncio.Queue()

    async def hook(request: Request) -> Response:
        await calls.put(None)
        return Response(status_code=503)

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serve(receiver) as url, PahoClient() as outside:
        r = await env.client.post("/mqtt/subscribe", json={
            "topic": env.base + "dead", "callback_url": f"{url}/hook",
            "secret": "s" * 32})
        assert r.json()["secret"] == "s" * 32
        await outside.publish(env.base + "dead", b"x")
        for _ in range(6):
            await asyncio.wait_for(calls.get(), 5)
        await asyncio.wait_for(env.proxy.flush(), 5)
    assert calls.empty()
    (listed,) = env.proxy.subscriptions()
    assert (listed["delivered"], listed["failed"], listed["failed_attempts"]) == (0, 1, 6)
    assert listed["delivery"] == "failing" and "HTTP" not in json.dumps(listed)


async def test_callback_url_is_validated(env: Env) -> None:
    for url in ("ftp://x/y", "not a url", "http://"):
        r = await env.client.post("/mqtt/subscribe",
                                  json={"topic": env.base + "v", "callback_url": url})
        assert r.status_code == 422, url
    r = await env.client.post("/mqtt/subscribe", json={"topic": env.base + "v",
                                                        "secret": "x" * 20})
    assert r.status_code == 422  # a secret without a callback_url is a mistake


async def test_mailbox_drops_oldest_and_counts() -> None:
    box: Mailbox[int] = Mailbox(2)
    for i in range(5):
        box.put(i)
    assert (len(box), box.dropped) == (2, 3)
    assert [await box.get(), await box.get()] == [3, 4]
    box.close()
    assert await box.get() is None


def test_retry_policy_defaults_and_backoff() -> None:
    policy = RetryPolicy()
    assert (policy.attempts, policy.base, policy.cap) == (6, 1.0, 30.0)
    ceilings = [1, 2, 4, 8, 16, 30, 30]  # jittered below these, never below the base
    for n, ceiling in enumerate(ceilings, start=1):
        waits = [policy.delay(n) for _ in range(200)]
        assert all(policy.base <= w <= ceiling for w in waits)
        assert n == 1 or len({round(w, 6) for w in waits}) > 100  # spread: not in lockstep


# -- Python API ------------------------------------------------------------------------------
async def test_python_api_round_trip(env: Env) -> None:
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    sync_got: list[tuple[str, bytes]] = []

    async def handler(topic: str, payload: bytes) -> None:
        await got.put((topic, payload))

    # Disjoint filters: with overlapping ones the broker may send one copy per matching
    # subscription (MQTT 5 §3.3.4), and each copy reaches every matching route.
    sub_id = await env.proxy.subscribe_to_topic(env.base + "py/+", handler)
    pattern_id = env.proxy.subscribe_pattern(env.base + "pat/#",
                                             lambda t, p: sync_got.append((t, p)))
    await asyncio.wait_for(env.proxy.flush(), 5)  # the scheduled SUBSCRIBE is done
    assert env.router.filters() == {env.base + "py/+": 1, env.base + "pat/#": 1}

    size = await env.proxy.publish_message(env.base + "py/a", {"k": [1, 2]})
    assert size == len(b'{"k":[1,2]}')
    assert await asyncio.wait_for(got.get(), 5) == (env.base + "py/a", b'{"k":[1,2]}')
    await env.proxy.publish_message(env.base + "pat/b/c", "text")
    await env.proxy.publish_message(env.base + "py/a", b"sentinel")
    # one connection, one publisher: pat/b/c is handled before the sentinel arrives
    assert await asyncio.wait_for(got.get(), 5) == (env.base + "py/a", b"sentinel")
    assert sync_got == [(env.base + "pat/b/c", b"text")]

    health = await env.proxy.health_check()
    assert health["connected"] is True and health["subscriptions"] == 2
    assert health["deliveries"] == 3 and health["published"] == 3

    await env.proxy.unsubscribe(sub_id)
    await env.proxy.unsubscribe(pattern_id)
    assert env.router.filters() == {}
    with pytest.raises(InputError):
        await env.proxy.unsubscribe(sub_id)
