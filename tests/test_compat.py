"""The replaced systems' users, as they are: the MQTT proxy's Python examples run through
``bridge.compat.MQTTProxy`` against both services' REST proxies (real processes on a
private Mosquitto), health's ``?ready=1`` / ``?strict=1``, and ``GET /mqtt/status``."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge import FleetClient
from bridge.compat import MQTTProxy, decode_payload
from bridge.errors import AuthError, ServiceUnreachableError
from callback_server import settings as cb_config
from callback_server.keys import add_key
from callback_server.service import CallbackServer
from edge_agent import settings as edge_config
from edge_agent.service import EdgeAgent
from tests.support.mariadb_proc import MariadbProcess
from tests.support.procs import MosquittoProcess, free_port
from tests.support.services import ADMIN_TOKEN, ServiceProcess, callback_server, edge_agent
from tests.support.waiting import eventually, eventually_async

EDGE_TOKEN = "edge-proxy-" + uuid.uuid4().hex[:8]
CODE = "compat-code"


# -- pure -----------------------------------------------------------------------------------
def test_payloads_reach_seed_handlers_decoded() -> None:
    assert decode_payload(b'{"messageId": "m1", "args": {}}') == {"messageId": "m1", "args": {}}
    assert decode_payload(b"online") == "online"  # a retained presence is text
    assert decode_payload("é".encode()) == "é"
    assert decode_payload(b"\xff\x00") == b"\xff\x00"  # binary stays bytes


def test_a_pattern_outside_the_event_loop_says_what_to_do() -> None:
    mqtt = MQTTProxy("http://127.0.0.1:9", "token")

    def handler(topic: str, payload: Any) -> None:
        return None

    with pytest.raises(RuntimeError) as refused:
        mqtt.subscribe_pattern("org/*/device/*/status", handler)
    assert "needs a running event loop" in str(refused.value)
    assert "async code" in str(refused.value)
    asyncio.run(mqtt.aclose())


# -- both services, as real processes ---------------------------------------------------------
@dataclass
class Stack:
    org: str
    edge: ServiceProcess
    cloud: ServiceProcess
    viewer_key: str  # a viewer key of another org, on the callback server

    def proxy(self, service: str) -> tuple[str, str]:
        """(base URL, token) of a service's REST proxy."""
        if service == "edge":
            return self.edge.admin_url, EDGE_TOKEN
        return self.cloud.url, ADMIN_TOKEN


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("compat")
    org = f"o{uuid.uuid4().hex[:8]}"
    keys = tmp / "keys.yaml"
    viewer = add_key(keys, "viewer-elsewhere", ["elsewhere"], "viewer")
    # The seed's proxy had no topic ACL: a migrating site widens the edge's (its own org
    # by default) to what its applications used, here every org.
    edge_yaml = tmp / "edge-agent.yaml"
    edge_yaml.write_text("proxy_allowed_prefixes: ['org/']\n")
    with MosquittoProcess(tmp / "mosquitto", persistence=False) as broker, \
            edge_agent(tmp, broker.url, org=org, code=CODE, PROXY_TOKEN=EDGE_TOKEN,
                       EDGE_AGENT_CONFIG=str(edge_yaml)) as edge, \
            callback_server(tmp, broker.url, f"sqlite:///{tmp / 'cb.db'}",
                            API_KEYS_FILE=str(keys)) as cloud:
        yield Stack(org, edge, cloud, viewer)


SERVICES = ["edge", "callback"]
integration = pytest.mark.integration


@integration
@pytest.mark.parametrize("service", SERVICES)
async def test_a_pattern_subscribed_without_await_receives_a_webhooks_envelope(
        stack: Stack, service: str) -> None:
    robot = f"R{uuid.uuid4().hex[:6]}"
    async with MQTTProxy(*stack.proxy(service)) as mqtt:
        received: list[tuple[str, Any]] = []

        # -- the seed's example (docs/migrating-mqtt-proxy.md), unchanged ---------------
        async def handler(topic: str, payload: dict[str, Any]) -> None:
            received.append((topic, payload))

        mqtt.subscribe_pattern("org/*/device/*/status", handler)      # local glob match
        # ---------------------------------------------------------------------------------
        health: dict[str, Any] = {}

        async def settled() -> bool:
            nonlocal health
            health = await mqtt.health_check()
            return bool(health["connection"]["callback_server"]) and \
                health["pending_subscriptions"] == []

        await eventually_async(settled, within=15, what="the seed settled")
        assert health["connection"] == {"ts_client": True, "callback_server": True,
                                        "connected": True}
        assert health["status"] == "healthy"
        async with httpx.AsyncClient() as pudu:
            answer = await pudu.post(stack.edge.url + "/api/pudu/webhook",
                                     headers={"CallbackCode": CODE},
                                     json={"callback_type": "notifyRobotStatus",
                                           "data": {"sn": robot, "run_state": "ONLINE"}})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["data"]["status"] == "online" and body["data"]["robot_sn"] == robot
        assert body["message"].startswith("Robot status processed: online")
        topic = f"org/{stack.org}/device/{robot}/status"
        await eventually_async(lambda: any(t == topic for t, _ in received))
    copies = [p for t, p in received if t == topic]
    # On the callback server the broker sends a second copy for its own consumer's shared
    # subscription, which the router hands to every matching route: at least once.
    assert all(copy == copies[0] for copy in copies)
    envelope = copies[0]
    assert isinstance(envelope, dict)
    assert (envelope["org"], envelope["device"], envelope["type"]) == (
        stack.org, robot, "notifyRobotStatus")
    assert envelope["data"]["status"] == "online"


@integration
@pytest.mark.parametrize("service", SERVICES)
async def test_a_command_handler_answers_with_send_command_response(
        stack: Stack, service: str) -> None:
    app = f"app-{uuid.uuid4().hex[:6]}"
    async with MQTTProxy(*stack.proxy(service)) as mqtt, \
            FleetClient(stack.cloud.url, ADMIN_TOKEN) as cloud:
        # -- the seed's example: a command handler answering on .../response ------------
        async def on_command(topic: str, payload: dict[str, Any]) -> None:
            response_topic = topic.rsplit("/", 1)[0] + "/response"
            if payload["command"] == "fail":
                await mqtt.send_command_response(response_topic, payload["messageId"],
                                                 "cannot", status="error")
            else:
                await mqtt.send_command_response(response_topic, payload["messageId"],
                                                 {"echo": payload["args"]})

        assert await mqtt.subscribe_to_topic(f"org/{stack.org}/device/{app}/command",
                                             on_command)
        # ---------------------------------------------------------------------------------
        ok = await cloud.send_command(app, "echo", {"n": 7}, timeout=10, org_id=stack.org)
        failed = await cloud.send_command(app, "fail", timeout=10, org_id=stack.org)
    assert (ok.status, ok.result) == ("success", {"echo": {"n": 7}})
    assert (failed.status, failed.error) == ("error", "cannot")


@integration
@pytest.mark.parametrize("service", SERVICES)
async def test_publish_message_is_true_or_false_and_raises_only_without_a_service(
        stack: Stack, service: str) -> None:
    base, token = stack.proxy(service)
    async with MQTTProxy(base, token) as mqtt:
        seen: list[tuple[str, Any]] = []

        async def handler(topic: str, payload: Any) -> None:
            seen.append((topic, payload))

        topic = f"org/{stack.org}/device/d-{uuid.uuid4().hex[:6]}/telemetry"
        assert await mqtt.subscribe_to_topic(topic, handler)
        # -- the seed's example --------------------------------------------------------
        ok = await mqtt.publish_message(topic, {"battery": 80}, qos=1)      # True / False
        # ---------------------------------------------------------------------------------
        refused = await mqtt.publish_message("elsewhere/device/x/telemetry", {"a": 1}, qos=1)
        reserved = await mqtt.publish_message("$SYS/x", {"a": 1}, qos=1)
        assert (ok, refused, reserved) == (True, False, False)
        assert mqtt.last_error is not None and "$SYS" in mqtt.last_error
        # A pattern the service refuses: awaited, it says so (False), and nothing waits.
        assert await mqtt.subscribe_pattern("elsewhere/*/x", handler) is False
        await eventually_async(lambda: bool(seen))  # (twice on the callback server: see above)
        assert set(json.dumps(x) for x in seen) == {json.dumps([topic, {"battery": 80}])}
    async with MQTTProxy(f"http://127.0.0.1:{free_port()}", token, timeout=2) as nowhere:
        with pytest.raises(ServiceUnreachableError):
            await nowhere.publish_message(topic, {"a": 1})
        health = await nowhere.health_check()
        assert health["connection"] == {"ts_client": False, "callback_server": False,
                                        "connected": False}
    async with MQTTProxy(base, "wrong-token") as stranger:
        with pytest.raises(AuthError):
            await stranger.publish_message(topic, {"a": 1})


@integration
async def test_mqtt_status_lists_what_the_caller_may_see_and_who_it_is(stack: Stack) -> None:
    async def noop(topic: str, payload: Any) -> None:
        return None

    async with MQTTProxy(stack.edge.admin_url, EDGE_TOKEN) as edge_app, \
            MQTTProxy(stack.cloud.url, ADMIN_TOKEN) as cloud_app:
        mine = f"org/{stack.org}/device/status-{uuid.uuid4().hex[:6]}/status"
        assert await edge_app.subscribe_to_topic(mine, noop)
        assert await cloud_app.subscribe_to_topic(mine, noop)
        async with httpx.AsyncClient() as http:
            edge = (await http.get(stack.edge.admin_url + "/mqtt/status",
                                   headers={"Authorization": f"Bearer {EDGE_TOKEN}"})).json()
            cloud = (await http.get(stack.cloud.url + "/mqtt/status",
                                    headers=stack.cloud.auth)).json()
            foreign = (await http.get(stack.cloud.url + "/mqtt/status", headers={
                "Authorization": f"Bearer {stack.viewer_key}"})).json()
    assert edge["device"] == {"service": "edge-agent", "org_id": stack.org, "gateway_id": "gw1"}
    assert cloud["device"]["service"] == "callback-server"
    for status in (edge, cloud):
        assert status["subscriptions"] == len(status["subscription_list"]) >= 1
        assert mine in [s["filter"] for s in status["subscription_list"]]
    # The viewer of another org: the count as before, but no other org's subscription.
    assert foreign["subscriptions"] >= 1 and foreign["subscription_list"] == []


@integration
def test_running_services_are_ready(stack: Stack) -> None:
    for url in (stack.edge.url + "/api/pudu/webhook/health", stack.cloud.url + "/callback/health"):
        r = httpx.get(url, params={"ready": "1"})
        assert r.status_code == 200 and r.json()["ready"] is True, r.text


# -- readiness and strictness, in process with the broker away --------------------------------
@pytest.fixture
async def edge_in_process(tmp_path: Path) -> AsyncIterator[tuple[EdgeAgent, httpx.AsyncClient]]:
    settings = edge_config.load(None, {
        "PUDU_CALLBACK_CODE": CODE, "MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",
        "ORG_ID": "acme", "GATEWAY_ID": "gw1", "OUTBOX_PATH": str(tmp_path / "outbox.db"),
        "MQTT_RECONNECT_MAX_SECONDS": "1"})
    agent = EdgeAgent(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=agent.app),
                                 base_url="http://gw") as client:
        yield agent, client


async def statuses(client: httpx.AsyncClient, path: str,
                   headers: dict[str, str] | None = None) -> dict[str, int]:
    return {q: (await client.get(path + q, headers=headers)).status_code
            for q in ("", "?ready=1", "?strict=1")}


async def test_edge_health_is_unready_before_start_and_ready_with_the_broker_down(
        edge_in_process: tuple[EdgeAgent, httpx.AsyncClient]) -> None:
    agent, client = edge_in_process
    path = "/api/pudu/webhook/health"
    before = await statuses(client, path)
    assert before["?ready=1"] == 503 and before["?strict=1"] == 503
    async with agent:
        during = await statuses(client, path)
        body = (await client.get(path)).json()
        # It takes webhooks into the outbox meanwhile: that is what readiness means.
        accepted = await client.post("/api/pudu/webhook", headers={"CallbackCode": CODE},
                                     json={"callback_type": "notifyRobotPower",
                                           "data": {"sn": "R1", "power": 40}})
        bad = await client.get(path + "?strict=maybe")
    assert during == {"": 200, "?ready=1": 200, "?strict=1": 503}
    assert (body["status"], body["broker_connected"], body["ready"]) == ("degraded", False, True)
    assert {"status", "timestamp", "service"} <= set(body)  # the seed's keys
    assert accepted.status_code == 200
    assert accepted.json()["message"].startswith("Robot power processed: 40%")
    assert "status" not in accepted.json()["data"]  # a power callback reports no state
    assert bad.status_code == 422 and bad.json()["field"] == "strict"


async def test_callback_health_is_unready_before_start_and_hides_the_database_without_a_key(
        tmp_path: Path) -> None:
    settings = cb_config.load(None, {
        "MQTT_URL": f"mqtt://127.0.0.1:{free_port()}", "PROXY_TOKEN": ADMIN_TOKEN,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}", "MQTT_RECONNECT_MAX_SECONDS": "1"})
    server = CallbackServer(settings)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    path = "/callback/health"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                                 base_url="http://cb") as client:
        before = await statuses(client, path)
        async with server:
            during = await statuses(client, path)
            public = (await client.get(path)).json()
            detailed = (await client.get(path, headers=admin)).json()
            unknown = await client.get(path, headers={"Authorization": "Bearer nope"})
    assert before["?ready=1"] == 503 and before["?strict=1"] == 503
    assert during == {"": 200, "?ready=1": 200, "?strict=1": 503}
    assert public["status"] == "degraded" and "broker not connected" in public["reasons"]
    assert public["ready"] is True and public["database_ok"] is True
    assert not {"database_error", "subscription", "pending", "stored"} & set(public)
    assert "cb.db" not in json.dumps(public)
    assert {"database_error", "subscription", "stored"} <= set(detailed)
    assert unknown.status_code == 200 and set(unknown.json()) == set(public)


@integration
def test_callback_server_is_unready_while_its_database_is_away(tmp_path: Path) -> None:
    db = MariadbProcess(tmp_path / "db")  # not started yet: the database is away
    with MosquittoProcess(tmp_path / "mosquitto", persistence=False) as broker, \
            callback_server(tmp_path, broker.url, db.url) as cs:
        url = cs.url + "/callback/health"
        away = httpx.get(url, params={"ready": "1"}, timeout=10)
        detailed = cs.health()
        with db:
            back = eventually(lambda: httpx.get(url, params={"ready": "1"}, timeout=10),
                              accept=lambda r: r.status_code == 200, within=30,
                              what="ready again (the server's own report)")
    assert away.status_code == 503, away.text
    assert "database unreachable" in away.json()["not_ready"]
    # The open body names no database host, port or name; a key gets the figures.
    assert str(db.port) not in away.text and "test" not in away.text.replace("timestamp", "")
    assert {"database_error", "pending", "stored"} <= set(detailed)
    assert back.json()["ready"] is True


@integration
async def test_a_pattern_made_while_the_service_is_down_subscribes_once_it_is_up(
        tmp_path: Path) -> None:
    org, admin_port = f"o{uuid.uuid4().hex[:8]}", free_port()
    received: list[tuple[str, Any]] = []

    async def handler(topic: str, payload: dict[str, Any]) -> None:
        received.append((topic, payload))

    with MosquittoProcess(tmp_path / "mosquitto", persistence=False) as broker:
        agent = edge_agent(tmp_path, broker.url, org=org, code=CODE, PROXY_TOKEN=EDGE_TOKEN,
                           EDGE_ADMIN_PORT=str(admin_port))
        async with MQTTProxy(f"http://127.0.0.1:{admin_port}", EDGE_TOKEN,
                             reconnect_max=0.5) as mqtt:
            pending = mqtt.subscribe_pattern(f"org/{org}/device/*/status", handler)
            assert not pending.subscribed  # nobody listens yet: it keeps trying
            health = await mqtt.health_check()
            assert health["pending_subscriptions"] == [f"org/{org}/device/*/status"]
            await asyncio.to_thread(agent.start)
            try:
                assert await asyncio.wait_for(pending, 30) is True
                async with httpx.AsyncClient() as pudu:
                    r = await pudu.post(agent.url + "/api/pudu/webhook",
                                        headers={"CallbackCode": CODE},
                                        json={"callback_type": "notifyRobotStatus",
                                              "data": {"sn": "R1", "run_state": "idle"}})
                assert r.status_code == 200, r.text
                await eventually_async(lambda: bool(received))
            finally:
                await asyncio.to_thread(agent.stop)
    [(topic, envelope)] = received
    assert topic == f"org/{org}/device/R1/status" and envelope["data"]["status"] == "idle"
