"""FleetClient against running services (real Mosquitto, real edge agent and callback server)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge import FleetClient, verify_signature
from bridge.client import Subscription, mqtt_filter
from bridge.errors import (
    AuthError,
    CommandTimeoutError,
    InputError,
    NotConnectedError,
    NotFoundError,
    ServiceError,
    ServiceUnreachableError,
    TopicError,
)
from bridge.http.error_boundary import status_for
from bridge.proxy import sign
from bridge.transport import InboundMessage
from tests.support.services import ADMIN_TOKEN, callback_server, edge_agent
from tests.support.waiting import eventually_async
from tests.test_commands import wait_gateways
from tests.test_proxy import serve

BROKER = "mqtt://127.0.0.1:1883"
TOKEN = "edge-proxy-token-" + uuid.uuid4().hex[:8]


def collector(into: list[InboundMessage], delay: float = 0.0
              ) -> tuple[Callable[[InboundMessage], Awaitable[None]], list[int]]:
    """A handler recording messages (sleeping ``delay`` in each), and its peak concurrency."""
    running = [0, 0]  # now, peak

    async def handler(message: InboundMessage) -> None:
        running[0] += 1
        running[1] = max(running)
        await asyncio.sleep(delay)
        into.append(message)
        running[0] -= 1

    return handler, running


# -- pure -----------------------------------------------------------------------------------
def test_patterns_translate_to_mqtt_filters() -> None:
    assert mqtt_filter("org/*/device/*/telemetry") == ("org/+/device/+/telemetry", None)
    assert mqtt_filter("org/a/#") == ("org/a/#", None)
    flt, match = mqtt_filter("org/a/device/robot-*/status")
    assert flt == "org/a/device/+/status" and match is not None
    assert match("org/a/device/robot-7/status")
    assert not match("org/a/device/other/status")
    assert not match("org/a/device/robot-7/status/extra")
    with pytest.raises(TopicError):
        mqtt_filter("org/#/x")


def test_verify_signature_matches_the_services_signer() -> None:
    body = b'{"topic":"t","payload":"x"}'
    header = sign("s" * 16, body)
    assert verify_signature(body, header, "s" * 16)
    assert verify_signature(body.decode(), header.upper().replace("SHA256", "sha256"),
                            "s" * 16)
    assert not verify_signature(body + b" ", header, "s" * 16)
    assert not verify_signature(body, header, "t" * 16)
    for bad in (None, "", "sha1=" + header[7:], "sha256", "sha256=zz"):
        assert not verify_signature(body, bad, "s" * 16)


# -- against running services ---------------------------------------------------------------
integration = pytest.mark.integration


@integration
async def test_publish_and_pattern_subscription_receive_in_order(tmp_path: Path) -> None:
    org = f"o{uuid.uuid4().hex[:8]}"
    with edge_agent(tmp_path, BROKER, org=org, PROXY_TOKEN=TOKEN) as agent:
        async with FleetClient(agent.admin_url, TOKEN) as client:
            got: list[InboundMessage] = []
            handler, running = collector(got, delay=0.01)  # slow enough to overlap
            globbed: list[InboundMessage] = []
            glob_handler, _ = collector(globbed)
            sub = await client.subscribe_pattern(f"org/{org}/device/*/telemetry", handler)
            await client.subscribe_pattern(f"org/{org}/device/robot-*/telemetry",
                                           glob_handler)
            assert sub.filter == f"org/{org}/device/+/telemetry"
            await eventually_async(lambda: all(s.live.is_set() for s in client.subscriptions))
            for i in range(30):
                device = "robot-1" if i % 3 else "cart-2"
                await client.publish_message(f"org/{org}/device/{device}/telemetry",
                                             {"seq": i}, qos=1)
            await client.publish_message(f"org/{org}/device/robot-1/telemetry",
                                         b"\x00\xffraw", qos=1)
            await eventually_async(lambda: len(got) == 31 and len(globbed) == 21)
            health = await client.health_check()
            with pytest.raises(InputError):
                await client.publish_message(f"org/{org}/x", "y", qos=2 + 1)
            assert await client.unsubscribe(f"org/{org}/device/*/telemetry") == 1
            assert [s.topic for s in client.subscriptions] == [
                f"org/{org}/device/robot-*/telemetry"]
        async with FleetClient(agent.admin_url, "wrong-token") as stranger:
            with pytest.raises(AuthError):
                await stranger.publish_message(f"org/{org}/x", "y")
    assert [json.loads(m.payload)["seq"] for m in got[:30]] == list(range(30))
    assert got[30].payload == b"\x00\xffraw"
    assert running[1] == 1  # one handler call at a time
    assert [json.loads(m.payload)["seq"] for m in globbed[:20]] == [
        i for i in range(30) if i % 3]  # the partial glob kept robot-* only
    assert globbed[20].payload == b"\x00\xffraw"
    assert health["connected"] is True and health["subscriptions"] == 2


@integration
async def test_subscription_resumes_after_the_service_restarts(tmp_path: Path) -> None:
    org = f"o{uuid.uuid4().hex[:8]}"
    topic = f"org/{org}/device/gw1/events"
    agent = edge_agent(tmp_path, BROKER, org=org, PROXY_TOKEN=TOKEN).start()
    try:
        async with FleetClient(agent.admin_url, TOKEN, reconnect_max=0.5) as client:
            got: list[InboundMessage] = []
            handler, _ = collector(got)
            sub = await client.subscribe_to_topic(topic, handler)
            await eventually_async(sub.live.is_set)
            await client.publish_message(topic, "before")
            await eventually_async(lambda: len(got) == 1)
            first_id = sub.id
            await asyncio.to_thread(agent.stop)  # cuts the stream; forgets the subscription
            await eventually_async(lambda: not sub.live.is_set())
            await asyncio.to_thread(agent.start)
            await eventually_async(lambda: sub.connects >= 2 and sub.live.is_set(), within=30)
            await client.publish_message(topic, "after")
            await eventually_async(lambda: len(got) == 2)
    finally:
        agent.stop()
    assert [m.payload for m in got] == [b"before", b"after"]
    assert sub.id != first_id  # subscribed again, same handler


@integration
async def test_a_reconnect_takes_over_from_a_reader_the_service_still_holds(
        tmp_path: Path) -> None:
    """A half-open connection: the service still holds the old reader when the client
    comes back. The client is not refused (409) forever; the newest reader wins."""
    org = f"o{uuid.uuid4().hex[:8]}"
    topic = f"org/{org}/device/gw1/events"
    with edge_agent(tmp_path, BROKER, org=org, PROXY_TOKEN=TOKEN) as agent:
        async with FleetClient(agent.admin_url, TOKEN, reconnect_max=0.5) as client, \
                httpx.AsyncClient(base_url=agent.admin_url, timeout=10, headers={
                    "Authorization": f"Bearer {TOKEN}"}) as stale:
            got: list[InboundMessage] = []
            sub = await client.subscribe_to_topic(topic, collector(got)[0])
            await eventually_async(sub.live.is_set)
            # Another connection on the same id stands in for the one the service has
            # not noticed is dead: it takes over, and the client's stream is cut.
            async with stale.stream("GET", "/mqtt/stream", params={"id": sub.id}) as old:
                assert old.status_code == 200
                await eventually_async(lambda: sub.connects >= 2 and sub.live.is_set())
                await client.publish_message(topic, "after the reconnect")
                await eventually_async(lambda: len(got) == 1)
    assert [m.payload for m in got] == [b"after the reconnect"]


@integration
async def test_command_round_trip_and_timeout(tmp_path: Path) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p) as server, \
            edge_agent(tmp_path, BROKER, org="acme", gateway="gwc", TOPIC_PREFIX=p):
        wait_gateways(server, {"gwc": "online"})
        async with FleetClient(server.url, ADMIN_TOKEN) as client:
            pong = await client.send_command("gwc", "ping", timeout=10)
            status = await client.send_command("gwc", "get_status")
            unknown = await client.send_command("gwc", "self_destruct")
            started = time.monotonic()
            with pytest.raises(CommandTimeoutError) as timed_out:
                await client.send_command("gwc", "ping", timeout=0.5, org_id="nobody-home")
            waited = time.monotonic() - started
    assert pong.status == "success" and pong.result["gateway_id"] == "gwc"
    assert "ping" in status.result["commands"]
    assert unknown.status == "error" and "unknown command" in (unknown.error or "")
    assert timed_out.value.device_id == "gwc" and timed_out.value.message_id
    assert 0.5 <= waited < 5


@integration
async def test_a_real_callback_push_verifies(tmp_path: Path) -> None:
    org = f"o{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[tuple[bytes, str | None]] = asyncio.Queue()

    async def hook(request: Request) -> Response:
        await received.put((await request.body(), request.headers.get("x-signature")))
        return Response(status_code=200)

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    with edge_agent(tmp_path, BROKER, org=org, PROXY_TOKEN=TOKEN,
                    CALLBACK_URL_ALLOW="127.0.0.1/32") as agent:
        async with serve(receiver) as url, FleetClient(agent.admin_url, TOKEN) as client:
            async with httpx.AsyncClient(base_url=agent.admin_url, headers={
                    "Authorization": f"Bearer {TOKEN}"}) as http:
                r = await http.post("/mqtt/subscribe", json={
                    "topic": f"org/{org}/push/#", "callback_url": f"{url}/hook"})
                assert r.status_code == 200, r.text
                secret = r.json()["secret"]
            await client.publish_message(f"org/{org}/push/a", {"n": 1})
            body, header = await asyncio.wait_for(received.get(), 15)
    assert verify_signature(body, header, secret)
    assert not verify_signature(body.replace(b"1", b"2"), header, secret)
    assert json.loads(body)["topic"] == f"org/{org}/push/a"


async def test_error_answers_map_onto_the_exception_tree() -> None:
    answers = {"/mqtt/status": (401, {"status": "error", "message": "no"}),
               "/mqtt/unsubscribe": (404, {"status": "error", "message": "gone"}),
               "/mqtt/publish": (503, {"status": "error", "message": "broker away"}),
               "/mqtt/subscribe": (422, {"status": "error", "message": "bad", "field": "qos"}),
               "/devices/gw/commands": (500, {"status": "error", "message": "boom"})}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/refused":
            raise httpx.ConnectError("refused", request=request)
        status, body = answers[request.url.path]
        return httpx.Response(status, json=body)

    async with FleetClient("http://svc", "k", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(AuthError):
            await c.health_check()
        with pytest.raises(NotConnectedError, match="broker away"):
            await c.publish_message("t", "x")
        with pytest.raises(InputError) as bad:
            await c.subscribe_to_topic("t", collector([])[0])
        assert (bad.value.field, status_for(bad.value)) == ("qos", 422)
        with pytest.raises(ServiceError) as failed:
            await c.send_command("gw", "ping")
        assert failed.value.status == 500
        gone = Subscription("t", "t", collector([])[0], id="sub_x")
        assert await c.unsubscribe(gone) == 1  # already gone on the service (404): ended
        with pytest.raises(NotFoundError):
            await c._request("POST", "/mqtt/unsubscribe", json_body={"id": "sub_x"})
        with pytest.raises(ServiceUnreachableError):
            await c._request("GET", "/refused")
        with pytest.raises(TopicError):
            await c.subscribe_pattern("a/#/b", collector([])[0])


def sse(*events: tuple[str, str]) -> httpx.Response:
    body = "".join(f"event: {name}\ndata: {data}\n\n" for name, data in events)
    return httpx.Response(200, content=body.encode(),
                          headers={"content-type": "text/event-stream"})


async def test_a_handler_may_unsubscribe_its_own_subscription() -> None:
    requests: list[tuple[str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append((request.url.path, request.content))
        if request.url.path == "/mqtt/subscribe":
            return httpx.Response(200, json={"id": "s1"})
        if request.url.path == "/mqtt/stream":
            return sse(("subscribed", '{"id":"s1"}'), ("message", '{"topic":"t","payload":"x"}'),
                       ("message", '{"topic":"t","payload":"y"}'))
        return httpx.Response(200, json={"removed": ["s1"]})

    async with FleetClient("http://svc", "k", transport=httpx.MockTransport(handler)) as c:
        seen: list[bytes] = []

        async def once(message: InboundMessage) -> None:
            seen.append(message.payload)
            assert await c.unsubscribe(sub) == 1

        sub = await c.subscribe_to_topic("t", once)
        assert sub.task is not None
        await asyncio.wait_for(asyncio.shield(sub.task), 5)  # the loop ended by itself
        assert sub.task.exception() is None and sub.handler_errors == 0
        assert c.subscriptions == []
    assert seen == [b"x"]  # nothing after the unsubscribe
    assert [p for p, _ in requests] == ["/mqtt/subscribe", "/mqtt/stream", "/mqtt/unsubscribe"]
    assert json.loads(requests[-1][1]) == {"id": "s1"}  # the service let it go too


async def test_malformed_events_and_unexpected_failures_do_not_end_a_subscription() -> None:
    streams = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal streams
        if request.url.path == "/mqtt/subscribe":
            return httpx.Response(200, json={"id": "s1"})
        streams += 1
        if streams == 1:
            raise RuntimeError("something nobody expected")
        if streams == 2:
            return sse(("subscribed", '{"id":"s1"}'), ("message", '{"topic":"t"}'),
                       ("message", "[1]"), ("message", "not json"),
                       ("message", '{"topic":"t","payload":"!!","encoding":"base64"}'),
                       ("dropped", "7"), ("message", '{"topic":"t","payload":"good"}'))
        return sse(("subscribed", '{"id":"s1"}'), ("message", '{"topic":"t","payload":"next"}'))

    got: list[InboundMessage] = []
    async with FleetClient("http://svc", "k", transport=httpx.MockTransport(handler),
                           reconnect_min=0.01, reconnect_max=0.02) as c:
        sub = await c.subscribe_to_topic("t", collector(got)[0])
        await eventually_async(lambda: len(got) >= 2)
        assert sub.task is not None and not sub.task.done()
    assert [m.payload for m in got[:2]] == [b"good", b"next"]


async def test_a_success_answer_that_is_not_json_is_a_service_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>a captive portal</html>")

    async with FleetClient("http://svc", "k", transport=httpx.MockTransport(handler)) as c:
        for call in (c.health_check(), c.publish_message("t", "x"),
                     c.send_command("gw", "ping"), c.subscribe_to_topic("t", collector([])[0])):
            with pytest.raises(ServiceError) as failed:
                await call
            assert failed.value.status == 200
