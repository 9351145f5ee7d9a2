"""Org-scoped keys: every route of the callback server's OpenAPI schema has an access rule,
and each key of each role, in two orgs, gets 401/403/404 or sees only its own orgs."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.envelope import Envelope
from bridge.http.paging import encode_cursor
from callback_server import settings as cb_config
from callback_server.alerts import Subject
from callback_server.keys import ALL_ORGS, Principal, add_key, remove_key
from callback_server.service import CallbackServer
from tests.support.dbutil import query
from tests.support.services import callback_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
ROLES = {  # name: (orgs, role)
    "admin": ([ALL_ORGS], "admin"),
    "viewer_all": ([ALL_ORGS], "viewer"),
    "viewer_a": (["acme"], "viewer"),
    "operator_a": (["acme"], "operator"),
    "ingest_a": (["acme"], "ingest"),
    "multi": (["acme", "beta"], "viewer"),
}
CALLERS = (*ROLES, "none", "unknown")


def envelope(org: str, sn: str, i: int, channel: str = "power") -> Envelope:
    data: dict[str, Any] = {"battery_level": i} if channel == "power" else {
        "event_id": f"e{i}", "event_level": "high", "event_type": "LowBattery"}
    return Envelope(id=f"m{i}-{sn}-{channel}", type="notifyRobotPower" if channel == "power"
                    else "robotErrorWarning", org=org, device=sn, gateway=f"gw-{org}",
                    ts=1_700_000_000 + i, received_at=1_700_000_001 + i, data=data,
                    raw=dict(data), channel=channel)


@dataclass
class Env:
    server: CallbackServer
    client: httpx.AsyncClient
    prefix: str
    keys: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)  # alerts and alert subscriptions

    def auth(self, caller: str) -> dict[str, str]:
        if caller == "none":
            return {}
        key = "not-a-key" if caller == "unknown" else self.keys[caller]
        return {"Authorization": f"Bearer {key}"}

    def topic(self, org: str, rest: str = "device/x/y") -> str:
        return f"{self.prefix}/org/{org}/{rest}"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    keys_file = tmp_path / "keys.yaml"
    keys = {name: add_key(keys_file, name, orgs, role)  # type: ignore[arg-type]
            for name, (orgs, role) in ROLES.items()}
    prefix = f"t{uuid.uuid4().hex[:8]}"
    settings = cb_config.load(None, {
        "MQTT_URL": BROKER, "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}",
        "TOPIC_PREFIX": prefix, "API_KEYS_FILE": str(keys_file),
        "MQTT_CLIENT_ID": f"access-{prefix}", "COMMAND_TIMEOUT_MAX": "0.2",
        # alert subscriptions point at a closed loopback port: nothing leaves the machine
        "CALLBACK_URL_ALLOW": "127.0.0.1/32"})
    async with CallbackServer(settings) as server:
        items = [(f"{prefix}/org/{e.org}/device/{e.device}/{e.channel}", e) for e in (
            envelope("acme", "A1", 1), envelope("acme", "A1", 2, "event"),
            envelope("beta", "B1", 3), envelope("beta", "B1", 4, "event"))]
        await server.store.write_batch(items)
        for org in ("acme", "beta"):
            server.gateways[f"{org}/gw-{org}"] = {"org_id": org, "gateway_id": f"gw-{org}",
                                                 "state": "online", "since": time.time()}
        ids = {}
        for org, sn in (("acme", "A1"), ("beta", "B1")):
            opened = await server.alert_store.open(Subject("robot_fault", org, "robot", sn),
                                                   "high", {}, time.time())
            assert opened is not None
            ids[f"alert_{org}"] = opened.alert.id
            sub = await server.alert_subscriptions.add_subscription(
                "http://127.0.0.1:9/hook", None, [org], "admin", time.time())
            ids[f"sub_{org}"] = sub.id
            hook = await server.webhooks.store.add(
                "http://127.0.0.1:9/hook", ["robot.error"], [org], "admin", time.time())
            ids[f"wh_{org}"] = hook.id
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cb",
                                     timeout=10) as client:
            yield Env(server, client, prefix, keys, ids)


READ = {"admin": 200, "viewer_all": 200, "viewer_a": 200, "operator_a": 200, "multi": 200,
        "ingest_a": 403, "none": 401, "unknown": 401}
FOREIGN_READ = {**READ, "viewer_a": 404, "operator_a": 404}  # an object of org beta
OPERATE = {**READ, "viewer_all": 403, "viewer_a": 403, "multi": 403}
FOREIGN_OPERATE = {**OPERATE, "operator_a": 403}  # a topic of org beta
INGEST = {"admin": 200, "ingest_a": 200, "viewer_all": 403, "viewer_a": 403,
          "operator_a": 403, "multi": 403, "none": 401, "unknown": 401}
METRICS = {**{c: 403 for c in ROLES}, "admin": 200, "viewer_all": 200,
           "none": 401, "unknown": 401}
OPEN = {c: 200 for c in CALLERS}


def requests(e: Env) -> dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, int]]]]:
    """For each route (method, path template): requests and the status each caller gets."""
    cmd = {"command": "ping", "timeout": 0.1}
    ok_or_timeout = 504  # no gateway answers here: reaching the broker is the pass
    return {
        ("post", "/callback/messages"): [
            ({"url": "/callback/messages",
              "content": envelope("acme", "A9", 9).to_json()}, INGEST)],
        ("get", "/callback/health"): [({"url": "/callback/health"}, OPEN)],
        # Pudu's webhook takes a CallbackCode, never a key (none is configured here)
        ("post", "/api/pudu/webhook"): [
            ({"url": "/api/pudu/webhook", "json": {"callback_type": "robotStatus",
                                                   "data": {"sn": "A1"}}},
             {c: 401 for c in CALLERS})],
        ("get", "/api/pudu/webhook/health"): [({"url": "/api/pudu/webhook/health"}, OPEN)],
        ("get", "/robots"): [({"url": "/robots"}, READ),
                             ({"url": "/robots?org=beta&limit=1"}, READ)],
        ("get", "/robots/{sn}"): [({"url": "/robots/A1"}, READ),
                                  ({"url": "/robots/B1"}, FOREIGN_READ)],
        ("get", "/robots/{sn}/events"): [({"url": "/robots/A1/events"}, READ),
                                         ({"url": "/robots/B1/events"}, FOREIGN_READ)],
        ("get", "/robots/{sn}/history"): [
            ({"url": "/robots/A1/history?since=0"}, READ),
            ({"url": "/robots/B1/history"}, FOREIGN_READ)],
        ("get", "/robots/{sn}/tasks"): [({"url": "/robots/A1/tasks"}, READ),
                                        ({"url": "/robots/B1/tasks"}, FOREIGN_READ)],
        ("post", "/devices/{device_id}/commands"): [
            ({"url": "/devices/gw-acme/commands", "json": cmd},
             {**OPERATE, "admin": ok_or_timeout, "operator_a": ok_or_timeout}),
            ({"url": "/devices/gw-beta/commands", "json": cmd},
             {**OPERATE, "admin": ok_or_timeout, "operator_a": 404, "viewer_a": 404})],
        ("get", "/gateways"): [({"url": "/gateways"}, READ)],
        ("get", "/ingestion-runs"): [({"url": "/ingestion-runs"}, READ),
                                     ({"url": "/ingestion-runs?org_id=beta"}, FOREIGN_READ)],
        ("post", "/robots/{sn}/commands"): [
            ({"url": "/robots/A1/commands", "json": cmd},
             {**OPERATE, "admin": ok_or_timeout, "operator_a": ok_or_timeout}),
            ({"url": "/robots/B1/commands", "json": cmd},
             {**OPERATE, "admin": ok_or_timeout, "operator_a": 404, "viewer_a": 404})],
        ("get", "/alerts"): [({"url": "/alerts"}, READ),
                             ({"url": "/alerts?org=beta&state=open&rule=robot_fault"}, READ)],
        ("get", "/alerts/{alert_id}"): [
            ({"url": f"/alerts/{e.ids['alert_acme']}"}, READ),
            ({"url": f"/alerts/{e.ids['alert_beta']}"}, FOREIGN_READ)],
        ("post", "/alerts/{alert_id}/ack"): [
            ({"url": f"/alerts/{e.ids['alert_acme']}/ack", "json": {}}, OPERATE),
            ({"url": f"/alerts/{e.ids['alert_beta']}/ack", "json": {"comment": "x"}},
             {**OPERATE, "operator_a": 404, "viewer_a": 404})],
        ("post", "/alerts/{alert_id}/silence"): [
            ({"url": f"/alerts/{e.ids['alert_acme']}/silence", "json": {"minutes": 5}},
             OPERATE),
            ({"url": f"/alerts/{e.ids['alert_beta']}/silence", "json": {"minutes": 5}},
             {**OPERATE, "operator_a": 404, "viewer_a": 404})],
        ("post", "/alert-subscriptions"): [
            ({"url": "/alert-subscriptions", "json": {"url": "http://127.0.0.1:9/h"}},
             OPERATE),
            ({"url": "/alert-subscriptions",
              "json": {"url": "http://127.0.0.1:9/h", "orgs": ["beta"]}}, FOREIGN_OPERATE)],
        ("get", "/alert-subscriptions"): [({"url": "/alert-subscriptions"}, OPERATE)],
        ("get", "/alert-subscriptions/{sub_id}/deliveries"): [
            ({"url": f"/alert-subscriptions/{e.ids['sub_acme']}/deliveries"}, OPERATE),
            ({"url": f"/alert-subscriptions/{e.ids['sub_beta']}/deliveries"},
             {**OPERATE, "operator_a": 404})],
        ("delete", "/alert-subscriptions/{sub_id}"): [
            ({"url": f"/alert-subscriptions/{e.ids['sub_beta']}"},
             {**OPERATE, "operator_a": 404}),
            ({"url": "/alert-subscriptions/asub_none"},
             {**OPERATE, "admin": 404, "operator_a": 404})],
        **{(m, f"{base}{p}"): cases for base in ("", "/api/v1")  # the same API, twice
           for (m, p), cases in webhook_cases(e).items()},
        # Console: the key is in the body, so a header (or none) changes nothing.
        ("post", "/console/session"): [
            ({"url": "/console/session", "json": {"key": "not-a-key"}},
             {c: 401 for c in CALLERS}),
            ({"url": "/console/session", "json": {"key": e.keys["viewer_a"]}}, OPEN),
            ({"url": "/console/session", "json": {"key": e.keys["ingest_a"]}},
             {c: 403 for c in CALLERS})],
        ("post", "/console/logout"): [({"url": "/console/logout"}, OPEN)],  # no cookie: no-op
        ("get", "/console/me"): [({"url": "/console/me"}, READ)],
        ("get", "/console/stream"): [  # refusals only: an admitted stream stays open
            ({"url": "/console/stream"}, {"ingest_a": 403, "none": 401, "unknown": 401})],
        ("get", "/metrics"): [({"url": "/metrics"}, METRICS)],
        ("post", "/mqtt/publish"): [
            ({"url": "/mqtt/publish", "json": {"topic": e.topic("acme"), "payload": 1}},
             OPERATE),
            ({"url": "/mqtt/publish", "json": {"topic": e.topic("beta"), "payload": 1}},
             FOREIGN_OPERATE)],
        ("post", "/mqtt/subscribe"): [
            ({"url": "/mqtt/subscribe", "json": {"topic": e.topic("acme", "#")}}, OPERATE),
            ({"url": "/mqtt/subscribe", "json": {"topic": e.topic("+", "#")}},
             FOREIGN_OPERATE),
            ({"url": "/mqtt/subscribe", "json": {"topic": "#"}},
             {**FOREIGN_OPERATE, "admin": 403})],  # outside the proxy's prefixes for all
        ("post", "/mqtt/unsubscribe"): [
            ({"url": "/mqtt/unsubscribe", "json": {"topic": e.topic("acme", "none")}},
             {**OPERATE, "admin": 404, "operator_a": 404}),
            ({"url": "/mqtt/unsubscribe", "json": {"topic": e.topic("beta", "none")}},
             {**FOREIGN_OPERATE, "admin": 404})],
        ("get", "/mqtt/status"): [({"url": "/mqtt/status"}, READ)],
        ("get", "/mqtt/subscriptions"): [({"url": "/mqtt/subscriptions"}, READ)],
        ("get", "/mqtt/subscriptions/{subscription_id}/deliveries"): [  # none such: 404
            ({"url": "/mqtt/subscriptions/sub_none/deliveries"},
             {**READ, **{c: 404 for c, s in READ.items() if s == 200}})],
        ("get", "/mqtt/stream"): [  # refusals only: an admitted stream stays open
            ({"url": "/mqtt/stream", "params": {"id": "sub_none"}},
             {**READ, **{c: 404 for c, s in READ.items() if s == 200}}),
            ({"url": "/mqtt/stream", "params": {"topic": f"{e.prefix}/org/beta/#"}},
             {"viewer_a": 403, "operator_a": 403, "ingest_a": 403, "none": 401,
              "unknown": 401}),
            ({"url": "/mqtt/stream", "params": {"topic": "#"}},  # beyond the proxy for all
             {**{c: 403 for c in ROLES}, "none": 401, "unknown": 401})],
    }


def webhook_cases(e: Env) -> dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, int]]]]:
    """``/webhooks`` routes (also under ``/api/v1``): operators of the webhook's orgs."""
    hook = {"url": "http://127.0.0.1:9/h", "events": ["robot.error"]}
    return {
        ("post", "/webhooks"): [
            ({"url": "/webhooks", "json": hook}, OPERATE),
            ({"url": "/webhooks", "json": {**hook, "orgs": ["beta"]}}, FOREIGN_OPERATE)],
        ("get", "/webhooks"): [({"url": "/webhooks"}, OPERATE)],
        ("get", "/webhooks/{hook_id}/deliveries"): [
            ({"url": f"/webhooks/{e.ids['wh_acme']}/deliveries"}, OPERATE),
            ({"url": f"/webhooks/{e.ids['wh_beta']}/deliveries"},
             {**OPERATE, "operator_a": 404})],
        ("delete", "/webhooks/{hook_id}"): [
            ({"url": "/webhooks/wh_none"}, {**OPERATE, "admin": 404, "operator_a": 404})],
    }


async def test_every_route_has_a_rule_and_every_caller_gets_its_answer(env: Env) -> None:
    table = requests(env)
    routes = {(m, p) for p, ops in env.server.app.openapi()["paths"].items() for m in ops}
    assert routes == set(table), f"routes without an access rule: {routes - set(table)}"
    failures = []
    for (method, _), cases in table.items():
        for kwargs, expect in cases:
            for caller, status in expect.items():
                r = await env.client.request(method.upper(), **kwargs,
                                             headers=env.auth(caller))
                env.client.cookies.clear()  # a console sign-in's cookie is no caller's
                if r.status_code != status:
                    failures.append((caller, method, kwargs, status, r.status_code,
                                     r.text[:200]))
                if r.status_code >= 400:
                    assert set(r.json()) <= {"status", "message", "timestamp", "field"}
                if r.status_code == 404 and "/robots/" in kwargs["url"]:
                    # a foreign robot looks exactly like a missing one
                    assert r.json()["message"] == f"robot {kwargs['url'].split('/')[2]} not found"
    assert not failures, "\n".join(map(str, failures))


async def test_each_key_sees_only_its_orgs(env: Env) -> None:
    async def sns(caller: str, url: str = "/robots") -> list[str]:
        r = await env.client.get(url, headers=env.auth(caller))
        assert r.status_code == 200, r.text
        return [x.get("robot_sn") or x.get("gateway_id") for x in r.json()["items"]]

    assert await sns("admin") == ["A1", "B1"]
    assert await sns("multi") == ["A1", "B1"]
    assert await sns("viewer_a") == ["A1"]
    assert await sns("viewer_a", "/robots?org=beta") == []
    assert await sns("admin", "/robots?org=beta") == ["B1"]
    assert await sns("admin", "/robots?gateway=gw-acme") == ["A1"]
    assert await sns("admin", "/robots?status=nope") == []
    assert await sns("viewer_a", "/gateways") == ["gw-acme"]
    assert await sns("admin", "/gateways") == ["gw-acme", "gw-beta"]
    events = (await env.client.get("/robots/A1/events", headers=env.auth("viewer_a"))).json()
    assert [e["event_id"] for e in events["items"]] == ["e2"] and events["next_cursor"] is None
    # Subscriptions: an operator's own appear to its viewers, another org's do not.
    r = await env.client.post("/mqtt/subscribe", headers=env.auth("admin"),
                              json={"topic": env.topic("beta", "#")})
    assert r.status_code == 200, r.text
    beta_id = r.json()["id"]
    r = await env.client.post("/mqtt/subscribe", headers=env.auth("operator_a"),
                              json={"topic": env.topic("acme", "#")})
    assert r.status_code == 200, r.text
    seen = (await env.client.get("/mqtt/subscriptions", headers=env.auth("viewer_a"))).json()
    assert [s["filter"] for s in seen["items"]] == [env.topic("acme", "#")]
    everything = (await env.client.get("/mqtt/subscriptions", headers=env.auth("admin"))).json()
    assert len(everything["items"]) == 2 and everything["next_cursor"] is None
    # Another org's subscription is answered like one that does not exist: 404, unnamed.
    for method, url, body in (("GET", f"/mqtt/stream?id={beta_id}", None),
                              ("POST", "/mqtt/unsubscribe", {"id": beta_id})):
        r = await env.client.request(method, url, json=body, headers=env.auth("operator_a"))
        assert r.status_code == 404 and "beta" not in r.text, (url, r.text)
    # The health check names no org, gateway or robot.
    health = (await env.client.get("/callback/health")).text
    assert not any(name in health for name in ("acme", "beta", "gw-", "A1", "B1"))


async def test_a_robot_command_reaches_the_keys_org_when_another_org_shares_the_sn(
        env: Env) -> None:
    # beta's robot A1 is heard of after acme's: acme's operator still commands acme's A1
    beta = envelope("beta", "A1", 50)
    await env.server.store.write_batch(
        [(f"{env.prefix}/org/beta/device/A1/power", beta)])
    answer = await env.client.post("/robots/A1/commands", headers=env.auth("operator_a"),
                                   json={"command": "ping", "timeout": 0.1})
    assert answer.status_code == 504, answer.text  # sent to gw-acme; no gateway answers
    assert "gw-acme" in answer.json()["message"]


async def test_commands_record_the_key_that_sent_them(env: Env, tmp_path: Path) -> None:
    r = await env.client.post("/devices/gw-acme/commands", headers=env.auth("operator_a"),
                              json={"command": "ping", "timeout": 0.1})
    assert r.status_code == 504
    rows = query(f"sqlite:///{tmp_path / 'cb.db'}",
                 "SELECT key_name, org_id, outcome FROM device_commands")
    assert rows == [{"key_name": "operator_a", "org_id": "acme", "outcome": "timeout"}]


async def test_ingest_of_another_orgs_envelope_dead_letters_it_and_refuses_only_all_foreign(
        env: Env, tmp_path: Path) -> None:
    mixed = [envelope("acme", "A5", 5).as_dict(), envelope("beta", "B5", 6).as_dict()]
    for headers, first in ((env.auth("ingest_a"), "stored"),
                           ({"X-Callback-Token": env.keys["ingest_a"]}, "duplicate")):
        r = await env.client.post("/callback/messages", content=json.dumps(mixed),
                                  headers=headers)
        assert r.status_code == 200, r.text
        assert [e["outcome"] for e in r.json()["results"]] == [first, "dead_lettered"]
        assert "'beta'" in r.json()["results"][1]["reason"]
    assert (await env.client.get("/robots/A5", headers=env.auth("admin"))).status_code == 200
    assert (await env.client.get("/robots/B5", headers=env.auth("admin"))).status_code == 404
    foreign = [envelope("beta", "B6", 7).as_dict(), envelope("beta", "B7", 8).as_dict()]
    r = await env.client.post("/callback/messages", content=json.dumps(foreign),
                              headers={"X-Callback-Token": env.keys["ingest_a"]})
    assert r.status_code == 403 and "beta" in r.json()["message"], r.text
    dead = query(f"sqlite:///{tmp_path / 'cb.db'}", "SELECT topic, reason FROM mqtt_dead_letters")
    assert sorted(d["topic"].rsplit("/org/", 1)[1] for d in dead) == [
        "beta/device/B5/power", "beta/device/B6/power", "beta/device/B7/power"]  # each once
    assert all(d["reason"].startswith("org not covered by the key") and "beta" in d["reason"]
               for d in dead)
    metrics = (await env.client.get("/metrics", headers=env.auth("admin"))).text
    assert 'callback_auth_refused_total{reason="foreign_org"} 1.0' in metrics


async def test_refusals_are_counted_by_reason(env: Env) -> None:
    await env.client.get("/robots")
    await env.client.get("/robots", headers=env.auth("unknown"))
    await env.client.get("/robots", headers=env.auth("ingest_a"))
    await env.client.get("/robots/B1", headers=env.auth("viewer_a"))
    metrics = (await env.client.get("/metrics", headers=env.auth("viewer_all"))).text
    for reason in ("missing", "unknown", "forbidden_role", "foreign_org"):
        assert f'callback_auth_refused_total{{reason="{reason}"}} 1.0' in metrics, metrics


@pytest.mark.parametrize("keys_file", [None, "keys: []\n"], ids=["unset", "empty-file"])
async def test_without_any_key_the_read_api_says_how_to_configure_one(
        tmp_path: Path, keys_file: str | None) -> None:
    # Unset, or the empty file `make install` writes: the read API and the REST proxy
    # both answer 401 with how to make a key (the proxy was not mounted: 404).
    extra = {}
    if keys_file is not None:
        (tmp_path / "keys.yaml").write_text(keys_file)
        extra["API_KEYS_FILE"] = str(tmp_path / "keys.yaml")
    settings = cb_config.load(None, {
        "MQTT_URL": BROKER, "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}",
        "MQTT_CLIENT_ID": f"nokeys-{uuid.uuid4().hex[:8]}", **extra})
    server = CallbackServer(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                                 base_url="http://cb") as client:
        for r in (await client.get("/robots"), await client.get("/mqtt/subscriptions")):
            assert r.status_code == 401
            assert "API_KEYS_FILE" in r.json()["message"] and "keys add" in r.json()["message"]


def test_principal_covers() -> None:
    p = Principal("k", frozenset({"acme"}), "viewer")
    assert p.covers("acme") and not p.covers("beta") and not p.covers(None)
    assert Principal("k", frozenset({ALL_ORGS}), "viewer").covers(None)


def _cli(*args: str, keys: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "callback_server", "keys", "--file",
                           str(keys), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_keys_cli_and_sighup_reload_on_a_real_process(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    first = _cli("add", "--name", "first", "--org", "acme", "--role", "viewer",
                 keys=keys).strip()
    assert keys.stat().st_mode & 0o777 == 0o600 and first not in keys.read_text()
    with callback_server(tmp_path, BROKER, f"sqlite:///{tmp_path / 'cb.db'}",
                         API_KEYS_FILE=str(keys)) as cs:
        assert cs.proc is not None

        def status(key: str) -> int:
            return httpx.get(cs.url + "/robots",
                             headers={"Authorization": f"Bearer {key}"}).status_code

        def reload_until(key: str, want: int) -> None:
            assert cs.proc is not None
            cs.proc.send_signal(signal.SIGHUP)
            eventually(lambda: status(key), accept=lambda got: got == want, within=10,
                       what=f"{want} answered after SIGHUP")

        assert status(first) == 200
        second = _cli("add", "--name", "second", "--org", "beta", "--org", "acme",
                      "--role", "operator", keys=keys).strip()
        assert status(second) == 401  # not before the reload
        reload_until(second, 200)
        listed = _cli("list", keys=keys)
        assert "first\tacme\tviewer" in listed and "second\tbeta,acme\toperator" in listed
        assert first not in listed and second not in listed
        _cli("remove", "--name", "first", keys=keys)
        reload_until(first, 401)
        assert status(second) == 200
        keys.write_text("keys: [{name: broken}]\n")  # a bad file keeps the keys it had
        cs.proc.send_signal(signal.SIGHUP)
        eventually(cs.log_path.read_text, within=10, what="the bad file read",
                   accept=lambda log: "keeping the 1 keys loaded before" in log)
        assert status(second) == 200  # after the refused reload, not before it
        assert cs.proc.poll() is None


async def test_lists_page_over_http_with_an_opaque_cursor(env: Env) -> None:
    auth = env.auth("admin")
    for url, key in (("/robots", "robot_sn"), ("/gateways", "gateway_id"),
                     ("/robots/A1/events", "event_id")):
        got, cursor = [], None
        while True:
            params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
            body = (await env.client.get(url, params=params, headers=auth)).json()
            assert set(body) == {"items", "next_cursor"} and len(body["items"]) <= 1
            got += [item[key] for item in body["items"]]
            if (cursor := body["next_cursor"]) is None:
                break
        full = (await env.client.get(url, headers=auth)).json()["items"]
        assert got == [item[key] for item in full] and got
    for params in ({"cursor": "!!"}, {"cursor": "WzEsMl0"}, {"limit": 1001}, {"limit": 0}):
        r = await env.client.get("/robots", params=params, headers=auth)
        assert r.status_code == 422, (params, r.text)


# Sort keys no list of this server returns, whatever its key's shape: wrong arity, or a
# value of the wrong type in some position (names where times are, lists, booleans).
FORGED_KEYS: tuple[list[Any], ...] = (
    [], [[1]], [{"a": 1}], [True], [True, "x"], ["x", 1], [1, 2], [None, "x"], ["x", "y", 3],
    [None, None, None], ["a", "b", "c", "d"])


async def test_every_list_refuses_a_forged_cursor_with_422(env: Env) -> None:
    # Generated from the schema: a list added later is checked too. A cursor comes back
    # from the client, so one made by hand must be a 422 naming it, never a 500.
    auth = env.auth("admin")
    lists = [path.replace("{sn}", "A1") for path, ops in env.server.app.openapi()["paths"].items()
             if any(p["name"] == "cursor" for p in ops.get("get", {}).get("parameters", []))]
    assert {"/robots", "/gateways", "/robots/A1/events", "/alerts"} <= set(lists)
    for url in lists:
        if "{" in url:  # a sub-resource of something this fixture does not make
            continue
        for key in FORGED_KEYS:
            r = await env.client.get(url, params={"cursor": encode_cursor(key)}, headers=auth)
            assert r.status_code == 422, (url, key, r.text)
            assert r.json()["field"] == "cursor"


async def test_a_removed_key_ends_its_console_sessions(env: Env, tmp_path: Path) -> None:
    # A session outlives the sign-in request: it holds only as long as its key does, so
    # removing (or changing) the key and reloading ends it, like the key itself.
    signed_in = await env.client.post("/console/session", json={"key": env.keys["operator_a"]})
    assert signed_in.status_code == 200, signed_in.text
    cookie = {"Cookie": f"console_session={signed_in.cookies['console_session']}"}
    env.client.cookies.clear()
    assert (await env.client.get("/robots", headers=cookie)).status_code == 200
    remove_key(tmp_path / "keys.yaml", "operator_a")
    assert (await env.client.get("/robots", headers=cookie)).status_code == 200  # not yet
    assert env.server.keys.reload()
    r = await env.client.get("/robots", headers=cookie)
    assert r.status_code == 401 and "removed or changed" in r.json()["message"]
    assert (await env.client.get("/robots", headers=cookie)).status_code == 401  # dropped


async def test_a_removed_key_ends_its_open_mqtt_stream(env: Env, tmp_path: Path) -> None:
    # A stream outlives the request that opened it: once its key is removed (SIGHUP), it
    # ends at the next message or keep-alive instead of feeding the former holder.
    env.server.proxy.keepalive_seconds = 0.1
    chunks: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
    leave = asyncio.Event()

    async def receive() -> MutableMapping[str, Any]:
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        await chunks.put(message)

    key = env.keys["viewer_a"].encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/mqtt/stream", "raw_path": b"",
             "query_string": f"topic={env.topic('acme', '#')}".encode(), "root_path": "",
             "headers": [(b"host", b"cb"), (b"authorization", b"Bearer " + key)],
             "client": ("127.0.0.1", 1), "server": ("cb", 80)}
    app = asyncio.create_task(env.server.app(scope, receive, send))
    try:
        start = await asyncio.wait_for(chunks.get(), 10)
        assert start["status"] == 200
        hello = await asyncio.wait_for(chunks.get(), 10)
        assert b"subscribed" in hello["body"]
        keepalive = await asyncio.wait_for(chunks.get(), 10)
        assert keepalive["more_body"] and b"keepalive" in keepalive["body"]
        remove_key(tmp_path / "keys.yaml", "viewer_a")
        assert env.server.keys.reload()
        async with asyncio.timeout(10):  # keep-alives every 0.1 s would go on for ever
            while (chunk := await chunks.get())["more_body"]:
                pass  # what was already on its way
        assert chunk["body"] == b""
        await asyncio.wait_for(app, 10)
    finally:
        leave.set()
        await asyncio.gather(app, return_exceptions=True)


async def test_gateways_show_their_clock_against_this_servers(env: Env) -> None:
    from bridge.topic import DeviceAddress

    beat = {"timestamp": int(time.time()) - 3600, "gateway_clock_offset_s": -3600.4,
            "outbox_depth": 0}
    env.server._on_gateway_message(DeviceAddress("acme", "gw-acme", "telemetry"),
                                   json.dumps(beat).encode())
    answer = await env.client.get("/gateways", headers=env.auth("viewer_a"))
    [row] = answer.json()["items"]
    assert abs(row["clock_offset_s"] + 3600) <= 2  # an hour behind this server's clock
    assert row["gateway_clock_offset_s"] == -3600.4  # and its robots' verdict


async def test_an_operator_at_the_stream_cap_is_told_so_not_that_the_database_is_down(
        env: Env) -> None:
    env.server.console.max_clients = 0  # every stream slot taken
    r = await env.client.get("/console/stream", headers=env.auth("operator_a"))
    body = r.json()
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert "console streams are open already" in body["message"]
    assert "database" not in body["message"]
