"""The three apps' OpenAPI says what they do: schemathesis generates requests from each
app's own schema and sends them in process (ASGI, no network), with a key of each role;
every answer must match the schema (status declared, content type, body schema), be in the
one error shape when it is an error, carry ``Retry-After`` on a 503 and hold no secret.
Every operation must answer 2xx at least once, so a run of 401s cannot pass. Generated
requests are well-formed JSON; a second pass sends each operation that takes a JSON body
malformed JSON and an oversized body, whose 400 and 413 must be declared too.

The services run on the memory broker and SQLite in one event loop of their own (a thread):
hypothesis drives synchronous tests, the apps and their stores live in that loop."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bridge.envelope import Envelope
from callback_server import settings as cb_config
from callback_server.alerts import Subject
from callback_server.keys import ALL_ORGS, add_key
from callback_server.service import CallbackServer
from edge_agent import settings as edge_config
from edge_agent.service import EdgeAgent
from tests.support.procs import free_port

T = TypeVar("T")
#: Generated requests per operation and role: ~50 operations in all, under a minute.
EXAMPLES = 12
PROXY_TOKEN = "fuzz-proxy-token-0123456789abcdef01"
RULE_TOKEN = "fuzz-rule-token-fedcba9876543210fe"
EDGE_CODE = "fuzz-edge-code-00112233445566778899"
CLOUD_CODE = "fuzz-cloud-code-99887766554433221100"
PUDU_SECRET = "fuzz-pudu-secret-5566778899aabbccdd"
#: callback server keys: (orgs, role); "reader" is the viewer role
ROLES = {"admin": ([ALL_ORGS], "admin"), "operator": (["acme"], "operator"),
         "reader": (["acme"], "viewer"), "ingest": (["acme"], "ingest")}


class Loop:
    """An event loop in a thread: the apps live there, the synchronous tests call in."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-apps",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Apps:
    loop: Loop
    cloud: CallbackServer
    edge: EdgeAgent
    keys: dict[str, str]
    known: dict[str, str]  # path parameters that name something that exists
    subscriptions: dict[str, str]  # per app ("cloud", "edge"): a callback subscription
    doomed: dict[str, list[str]]  # path parameters for the DELETE routes, one each
    secrets: list[str] = field(default_factory=list)


async def _seed(server: CallbackServer, prefix: str) -> tuple[dict[str, str],
                                                               dict[str, list[str]]]:
    """A robot with events, an alert, an alert subscription and a webhook of org acme;
    and subscriptions and webhooks for the DELETE routes to remove."""
    data: list[dict[str, Any]] = [{"battery_level": 50}, {"event_id": "e1", "event_level": "high",
                                    "event_type": "LowBattery"}]
    items = []
    for i, (channel, body) in enumerate(zip(("power", "event"), data, strict=True)):
        env = Envelope(id=f"m{i}", type="notifyRobotPower" if channel == "power"
                       else "robotErrorWarning", org="acme", device="A1", gateway="gw1",
                       ts=time.time() - 60 + i, received_at=time.time() - 59 + i, data=body,
                       raw=dict(body), channel=channel)
        items.append((f"{prefix}/org/acme/device/A1/{channel}", env))
    await server.store.write_batch(items)
    opened = await server.alert_store.open(Subject("robot_fault", "acme", "robot", "A1"),
                                           "high", {}, time.time())
    assert opened is not None
    subs = [await server.alert_subscriptions.add_subscription(
        "http://127.0.0.1:9/hook", None, ["acme"], "admin", time.time()) for _ in range(2)]
    hooks = [await server.webhooks.store.add("http://127.0.0.1:9/hook", ["robot.error"],
                                             ["acme"], "admin", time.time()) for _ in range(3)]
    return ({"sn": "A1", "device_id": "gw1", "alert_id": str(opened.alert.id),
             "sub_id": str(subs[0].id), "hook_id": str(hooks[0].id)},
            {"sub_id": [str(subs[1].id)], "hook_id": [str(h.id) for h in hooks[1:]]})


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apps]:
    tmp = tmp_path_factory.mktemp("openapi-fuzz")
    keys_file = tmp / "keys.yaml"
    keys = {name: add_key(keys_file, f"fuzz-{name}", orgs, role)  # type: ignore[arg-type]
            for name, (orgs, role) in ROLES.items()}
    broker, prefix = f"fz{uuid.uuid4().hex[:8]}", "fuzz"
    common = {"MQTT_URL": f"mqtt://{broker}", "MQTT_BACKEND": "memory", "TOPIC_PREFIX": prefix}
    cloud_settings = cb_config.load(None, {
        **common, "DATABASE_URL": f"sqlite:///{tmp / 'cb.db'}", "API_KEYS_FILE": str(keys_file),
        "PROXY_TOKEN": PROXY_TOKEN, "CALLBACK_TOKEN": RULE_TOKEN,
        "CALLBACK_CODES": f"{CLOUD_CODE}=acme", "COMMAND_TIMEOUT_MAX": "2",
        # alert and webhook targets: a closed loopback port, nothing leaves the machine
        "CALLBACK_URL_ALLOW": "127.0.0.1/32", "MQTT_CLIENT_ID": f"cb-{broker}"})
    edge_settings = edge_config.load(None, {
        **common, "PUDU_CALLBACK_CODE": EDGE_CODE, "ORG_ID": "acme", "GATEWAY_ID": "gw1",
        "PROXY_TOKEN": PROXY_TOKEN, "OUTBOX_PATH": str(tmp / "outbox.db"),
        "CALLBACK_URL_ALLOW": "127.0.0.1/32",
        # Pudu's cloud API configured, so /pudu/poll and /pudu/runs are in the schema: a
        # closed loopback port (a poll's run fails at once and is recorded), no schedule
        "PUDU_API_URL": f"http://127.0.0.1:{free_port()}", "PUDU_API_KEY": "fuzz-key",
        "PUDU_API_SECRET": PUDU_SECRET, "PUDU_SHOP_IDS": "1", "PUDU_POLL_INTERVAL": "0",
        "PUDU_API_RETRIES": "0", "PUDU_API_TIMEOUT_SECONDS": "2"})
    loop = Loop()
    stack = AsyncExitStack()

    async def start() -> Apps:
        cloud = await stack.enter_async_context(CallbackServer(cloud_settings))
        edge = await stack.enter_async_context(EdgeAgent(edge_settings))
        known, doomed = await _seed(cloud, prefix)
        # on a topic nothing is published to: no delivery is attempted
        subscriptions = {name: (await proxy.add_callback_subscription(
            "fuzz/org/acme/device/A1/quiet", "http://127.0.0.1:9/sub"))[0]
            for name, proxy in (("cloud", cloud.proxy), ("edge", edge.proxy))}
        return Apps(loop, cloud, edge, keys, known, subscriptions, doomed,
                    [*keys.values(), PROXY_TOKEN, RULE_TOKEN, EDGE_CODE, CLOUD_CODE,
                     PUDU_SECRET])

    try:
        started = loop.run(start())
        yield started
        loop.run(_end(started, stack))
    finally:
        loop.close()


async def _end(apps: Apps, stack: AsyncExitStack) -> None:
    apps.edge.end_streams()
    apps.cloud.end_streams()
    await stack.aclose()


# -- sending a case ---------------------------------------------------------------------------
async def _request(app: FastAPI, kwargs: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://app", timeout=10,
                                 cookies=kwargs.get("cookies")) as client:
        return await client.request(
            kwargs["method"], kwargs["url"], headers=kwargs.get("headers"),
            params=kwargs.get("params"), json=kwargs.get("json"),
            content=kwargs.get("data"))


async def _stream_head(app: FastAPI, kwargs: dict[str, Any]) -> httpx.Response:
    """A Server-Sent Events route: its status, headers and first bytes, then the client
    leaves (httpx's ASGI transport would wait for the end of an endless stream)."""
    url = httpx.URL("http://app").join(kwargs["url"]).copy_merge_params(
        kwargs.get("params") or {})
    headers = {"host": "app", **(kwargs.get("headers") or {})}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": kwargs["method"], "scheme": "http", "path": url.path,
             "raw_path": url.raw_path.split(b"?")[0], "query_string": url.query,
             "root_path": "", "server": ("app", 80), "client": ("127.0.0.1", 50000),
             "headers": [(k.lower().encode(), str(v).encode()) for k, v in headers.items()]}
    start: dict[str, Any] = {}
    chunks: list[bytes] = []
    answered, gone = asyncio.Event(), asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            if message["status"] == 200:
                answered.set()  # a stream: the head is what is checked
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                answered.set()

    task = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
    await asyncio.wait_for(answered.wait(), 10)
    gone.set()
    with suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    response = httpx.Response(start["status"], headers=[(k.decode(), v.decode())
                                                        for k, v in start["headers"]],
                              content=b"".join(chunks),
                              request=httpx.Request(kwargs["method"], url, headers=headers))
    response.elapsed = datetime.timedelta(0)  # read from memory: nothing to time
    return response


# -- the project's own checks -----------------------------------------------------------------
ERROR_KEYS = {"status", "message", "timestamp", "field"}


def check_project_rules(response: httpx.Response, secrets: list[str]) -> None:
    """One error shape, Retry-After on a 503, no secret in a body."""
    for secret in secrets:
        assert secret not in response.text, "a secret in the body"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) <= ERROR_KEYS and body["status"] == "error", body
        assert isinstance(body["message"], str) and body["message"], body
        assert isinstance(body["timestamp"], int), body
    if response.status_code == 503:
        assert int(response.headers["retry-after"]) > 0


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@dataclass
class Target:
    """Where one operation's requests go, and what they are checked for."""

    apps: Apps
    app: FastAPI
    stream: bool  # Server-Sent Events: the head and first bytes only

    def check(self, case: Any, headers: dict[str, str]) -> int:
        """Send ``case``, check the answer every way; its status."""
        kwargs = case.as_transport_kwargs(base_url="http://app", headers=headers)
        send = _stream_head if self.stream else _request
        response = self.apps.loop.run(send(self.app, kwargs))
        check_project_rules(response, self.apps.secrets)
        case.validate_response(response, checks=CHECKS)
        return int(response.status_code)


def fuzz_operation(target: Target, operation: Any, auths: dict[str, dict[str, str]],
                   known: dict[str, str], seeds: list[dict[str, Any]]) -> int:
    """Generated requests for one operation (with each caller, some naming what exists,
    some with a known-good body), then each seed with each caller; how many got a 2xx."""
    strategies = [operation.as_strategy()]
    if known:
        strategies.append(operation.as_strategy(path_parameters=known))
    strategies += [operation.as_strategy(path_parameters=known, **seed) for seed in seeds]
    ok = 0

    # derandomize: the same draw every run, so a verdict never depends on the seed
    @given(case=st.one_of(strategies), caller=st.sampled_from(sorted(auths)))
    @settings(max_examples=EXAMPLES * len(auths), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case: Any, caller: str) -> None:
        nonlocal ok
        ok += 200 <= target.check(case, auths[caller]) < 300

    run()
    for seed in seeds:  # each role's answer to a request that can succeed is checked too
        for headers in auths.values():
            ok += 200 <= target.check(operation.Case(path_parameters=known, **seed),
                                      headers) < 300
    return ok


def fuzz_app(apps: Apps, app: FastAPI, auths: dict[str, dict[str, str]],
             seeds: dict[tuple[str, str], list[dict[str, Any]]],
             documented_5xx: set[int], known_here: dict[str, str],
             serving: Callable[[str], FastAPI] | None = None) -> Counter[str]:
    """Every operation of ``app``'s schema, with each caller; returns 2xx per operation.
    ``serving``: the app that serves a path, where it is not ``app`` itself."""
    schema = schemathesis.openapi.from_dict(app.openapi())
    # a 5xx other than these (a 500: a bug) fails; status_code_conformance wants these
    # declared by each operation that answers them
    schema.config.checks.not_a_server_error.expected_statuses = [
        "2xx", "3xx", "4xx", *(str(s) for s in sorted(documented_5xx))]
    ok: Counter[str] = Counter()
    for result in schema.get_all_operations():
        # an unreadable operation is an Err, which has no ok(): the test fails on it
        operation = result.ok()  # type: ignore[union-attr]
        method = operation.method.upper()
        names = [p.name for p in operation.path_parameters]
        everything = {**apps.known, **known_here}
        if method == "DELETE":  # its own object: the other operations keep theirs
            everything.update({n: ids.pop() for n, ids in apps.doomed.items()
                               if n in names and ids})
        known = {n: everything[n] for n in names if n in everything}
        target = Target(apps, serving(operation.path) if serving else app,
                        operation.path.endswith("/stream"))
        mine = [{"media_type": "application/json", **seed}
                for seed in seeds.get((method, operation.path), [])]
        ok[f"{method} {operation.path}"] = fuzz_operation(target, operation, auths, known,
                                                          mine)
    return ok


#: Bodies no generated case sends: cut-off JSON, and valid JSON past every route's limit
#: (the largest is the proxy's, six times its 128 KiB payload).
MALFORMED = b'{"topic": "fuzz/org/acme/device/A1/fuzz", "payload": '
OVERSIZED = b'{"pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'


def refuse_bad_bodies(apps: Apps, app: FastAPI, headers: dict[str, str],
                      known_here: dict[str, str],
                      serving: Callable[[str], FastAPI] | None = None) -> list[str]:
    """Malformed JSON (400) and an oversized body (413) to every operation of ``app``'s
    schema that takes a JSON body, as a caller every check admits: each answer is that
    status, declared by the operation, in the one error shape. The operations sent."""
    sent = []
    names = {**apps.known, **known_here}
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            if "application/json" not in operation.get("requestBody", {}).get("content", {}):
                continue
            for body, expected in ((MALFORMED, 400), (OVERSIZED, 413)):
                response = apps.loop.run(_request(serving(path) if serving else app, {
                    "method": method.upper(), "url": path.format(**names), "data": body,
                    "headers": {**headers, "Content-Type": "application/json"}}))
                label = f"{method.upper()} {path} {len(body)} bytes"
                check_project_rules(response, apps.secrets)
                assert response.status_code == expected, (label, response.text)
                assert str(expected) in operation["responses"], f"{label}: not declared"
            sent.append(f"{method.upper()} {path}")
    return sent


def assert_every_operation_answered(ok: Counter[str]) -> None:
    never = sorted(label for label, n in ok.items() if n == 0)
    assert not never, f"operations never answered 2xx: {never}"
    assert len(ok) > 0


# -- the three apps ---------------------------------------------------------------------------
#: A topic the proxies subscribe to and publish on; UNSUBSCRIBED is subscribed to and dropped.
TOPIC = "fuzz/org/acme/device/A1/fuzz"
UNSUBSCRIBED = "fuzz/org/acme/device/A1/gone"
PROXY_SEEDS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("POST", "/mqtt/publish"): [{"body": {"topic": TOPIC, "payload": {"n": 1}, "qos": 1}}],
    ("POST", "/mqtt/subscribe"): [{"body": {"topic": UNSUBSCRIBED, "qos": 1}}],
    ("POST", "/mqtt/unsubscribe"): [{"body": {"topic": UNSUBSCRIBED}}],
    ("GET", "/mqtt/stream"): [{"query": {"topic": TOPIC}}],
}
ENVELOPE = {"v": 1, "id": "fz1", "type": "notifyRobotPower", "org": "acme", "device": "A2",
            "ts": 1_700_000_001, "data": {"battery_level": 1}, "raw": {}}
CALLBACK = {"callback_type": "notifyRobotPower",
            "data": {"sn": "A3", "power": 40, "charge_state": "Charging"}}


def test_callback_server_schema_holds_for_every_role(apps: Apps) -> None:
    auths = {role: {"Authorization": f"Bearer {key}", "X-Callback-Token": RULE_TOKEN,
                    "CallbackCode": CLOUD_CODE}
             for role, key in apps.keys.items()}
    seeds: dict[tuple[str, str], list[dict[str, Any]]] = {
        **PROXY_SEEDS,
        ("POST", "/callback/messages"): [{"body": ENVELOPE}],
        ("POST", "/api/pudu/webhook"): [{"body": CALLBACK}],
        ("POST", "/devices/{device_id}/commands"): [
            {"body": {"command": "ping", "org_id": "acme", "timeout": 2}}],
        ("POST", "/robots/{sn}/commands"): [{"body": {"command": "ping", "timeout": 2}}],
        ("POST", "/alerts/{alert_id}/ack"): [{"body": {}}],
        ("POST", "/alerts/{alert_id}/silence"): [{"body": {"seconds": 60}}],
        ("POST", "/alert-subscriptions"): [{"body": {"url": "http://127.0.0.1:9/a",
                                                     "orgs": ["acme"]}}],
        ("POST", "/console/session"): [{"body": {"key": apps.keys["reader"]}}],
        ("POST", "/webhooks"): [{"body": {"url": "http://127.0.0.1:9/w",
                                          "events": ["robot.error"], "orgs": ["acme"]}}],
        ("POST", "/api/v1/webhooks"): [{"body": {"url": "http://127.0.0.1:9/w",
                                                 "events": ["robot.error"],
                                                 "orgs": ["acme"]}}],
    }
    ok = fuzz_app(apps, apps.cloud.app, auths, seeds, {503, 504},
                  {"subscription_id": apps.subscriptions["cloud"]})
    assert_every_operation_answered(ok)


def test_callback_server_declares_its_answers_to_bad_bodies(apps: Apps) -> None:
    headers = {"Authorization": f"Bearer {apps.keys['admin']}", "CallbackCode": CLOUD_CODE}
    sent = refuse_bad_bodies(apps, apps.cloud.app, headers,
                             {"subscription_id": apps.subscriptions["cloud"]})
    assert {"POST /devices/{device_id}/commands", "POST /robots/{sn}/commands",
            "POST /alert-subscriptions", "POST /webhooks", "POST /api/v1/webhooks",
            "POST /console/session", "POST /mqtt/subscribe", "POST /callback/messages",
            "POST /api/pudu/webhook"} <= set(sent)


def test_edge_webhook_schema_holds(apps: Apps) -> None:
    seeds = {("POST", "/api/pudu/webhook"): [{"body": CALLBACK}]}
    ok = fuzz_app(apps, apps.edge.app, {"pudu": {"CallbackCode": EDGE_CODE}}, seeds, {503}, {})
    assert_every_operation_answered(ok)


def test_edge_admin_schema_holds(apps: Apps) -> None:
    seeds = {**PROXY_SEEDS, ("POST", "/api/pudu/webhook"): [{"body": CALLBACK}]}
    # the admin app's schema also describes the webhook, which the public listener serves
    auth = {"admin": {"Authorization": f"Bearer {PROXY_TOKEN}", "CallbackCode": EDGE_CODE}}
    ok = fuzz_app(apps, apps.edge.admin_app, auth, seeds, {503, 504},
                  {"subscription_id": apps.subscriptions["edge"]}, serving=edge_serving(apps))
    assert_every_operation_answered(ok)
    assert {"POST /pudu/poll", "GET /pudu/runs"} <= set(ok)


def edge_serving(apps: Apps) -> Callable[[str], FastAPI]:
    """The edge app that serves a path of the admin app's schema (which also describes
    the webhook of the public listener)."""
    return lambda path: apps.edge.app if path.startswith("/api/pudu/") else apps.edge.admin_app


def test_edge_declares_its_answers_to_bad_bodies(apps: Apps) -> None:
    headers = {"Authorization": f"Bearer {PROXY_TOKEN}", "CallbackCode": EDGE_CODE}
    sent = refuse_bad_bodies(apps, apps.edge.admin_app, headers,
                             {"subscription_id": apps.subscriptions["edge"]},
                             serving=edge_serving(apps))
    assert {"POST /mqtt/publish", "POST /mqtt/subscribe", "POST /mqtt/unsubscribe",
            "POST /api/pudu/webhook"} <= set(sent)


@pytest.mark.parametrize("timeout", [5e-324, 0.05, 3601])
def test_a_command_timeout_out_of_bounds_is_refused_not_waited_for(
        apps: Apps, timeout: float) -> None:
    """5e-324 s used to be accepted and answered 504: the bounds are stated and enforced."""
    paths = apps.cloud.app.openapi()["paths"]
    for route in ("/devices/{device_id}/commands", "/robots/{sn}/commands"):
        body_schema = paths[route]["post"]["requestBody"]["content"]["application/json"]
        bounds = body_schema["schema"]["properties"]["timeout"]
        assert (bounds["minimum"], bounds["maximum"]) == (0.1, 3600)
    for path, body in (("/devices/gw1/commands", {"command": "ping", "org_id": "acme"}),
                       ("/robots/A1/commands", {"command": "ping"})):
        answer = apps.loop.run(_request(apps.cloud.app, {
            "method": "POST", "url": path, "json": {**body, "timeout": timeout},
            "headers": {"Authorization": f"Bearer {apps.keys['operator']}"}}))
        assert answer.status_code == 422 and answer.json()["field"] == "timeout", answer.text


async def _ignore(topic: str, payload: bytes) -> None:
    return None


def test_the_proxys_conflicts_and_cap_are_declared(apps: Apps) -> None:
    """409 and 429 are answers no generated request is sure to meet: each is provoked
    here, on both proxies, and must be declared by its operation."""
    for app, proxy, key, webhook_sub in (
            (apps.cloud.app, apps.cloud.proxy, apps.keys["admin"], apps.subscriptions["cloud"]),
            (apps.edge.admin_app, apps.edge.proxy, PROXY_TOKEN, apps.subscriptions["edge"])):
        headers = {"Authorization": f"Bearer {key}"}
        declared = app.openapi()["paths"]
        app_owned = apps.loop.run(proxy.subscribe_to_topic(
            "fuzz/org/acme/device/A1/app", _ignore))  # the application's own
        saved, proxy.max_subscriptions = proxy.max_subscriptions, 0  # at the cap
        try:
            answers = {
                ("get", "/mqtt/stream"): apps.loop.run(_stream_head(app, {
                    "method": "GET", "url": "/mqtt/stream", "params": {"id": webhook_sub},
                    "headers": headers})),
                ("post", "/mqtt/unsubscribe"): apps.loop.run(_request(app, {
                    "method": "POST", "url": "/mqtt/unsubscribe", "json": {"id": app_owned},
                    "headers": headers})),
                ("post", "/mqtt/subscribe"): apps.loop.run(_request(app, {
                    "method": "POST", "url": "/mqtt/subscribe", "json": {"topic": TOPIC},
                    "headers": headers})),
            }
        finally:
            proxy.max_subscriptions = saved
            apps.loop.run(proxy.unsubscribe(app_owned))
        statuses = {route: answer.status_code for route, answer in answers.items()}
        assert statuses == {("get", "/mqtt/stream"): 409, ("post", "/mqtt/unsubscribe"): 409,
                            ("post", "/mqtt/subscribe"): 429}, statuses
        for (method, path), status in statuses.items():
            check_project_rules(answers[method, path], apps.secrets)
            assert str(status) in declared[path][method]["responses"], (method, path)
