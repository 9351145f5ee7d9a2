"""Webhooks by event type, in process against a real batch writer (SQLite), real
loopback receivers (uvicorn) and the real outbound client: each subscribed event once,
signed, with retries in the delivery log; nothing for another org; the outbound rule at
``POST``; ``/api/v1/webhooks`` is the same API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge import verify_signature
from bridge.envelope import Envelope
from callback_server import settings as cb_config
from callback_server.batcher import Settled
from callback_server.keys import ALL_ORGS, add_key
from callback_server.service import CallbackServer
from tests.support.dbutil import scratch_mysql_database
from tests.support.waiting import eventually_async
from tests.test_proxy import BROKER, serve

pytestmark = pytest.mark.integration


@dataclass
class Env:
    server: CallbackServer
    client: httpx.AsyncClient
    keys: dict[str, str]

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


@pytest.fixture(params=["sqlite", "mysql"])
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    """CALLBACK_URL_ALLOW=127.0.0.1/32 (the test's receivers); 3 attempts, quick back-off;
    on SQLite and on a scratch MariaDB database (the webhook tables on both)."""
    with contextlib.ExitStack() as stack:
        database = (f"sqlite:///{tmp_path / 'cb.db'}" if request.param == "sqlite"
                    else stack.enter_context(scratch_mysql_database()))
        async for e in start(tmp_path, database):
            yield e


async def start(tmp_path: Path, database: str, prefix: str | None = None,
                **more: str) -> AsyncIterator[Env]:
    """A callback server on ``database``; ``prefix``: the topic prefix of an earlier one
    (a restart sees its retained messages); ``more``: further settings."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.unlink(missing_ok=True)  # a restart in one test makes its keys afresh
    keys = {"admin": add_key(keys_file, "admin", [ALL_ORGS], "admin"),
            "op_pg": add_key(keys_file, "op_pg", ["pg"], "operator"),
            "op_other": add_key(keys_file, "op_other", ["other"], "operator"),
            "viewer_pg": add_key(keys_file, "viewer_pg", ["pg"], "viewer")}
    rules = tmp_path / "alert-rules.yaml"
    rules.write_text("delivery: {attempts: 3, base_seconds: 0.01, cap_seconds: 0.02}\n")
    prefix = prefix or f"t{uuid.uuid4().hex[:8]}"
    settings = cb_config.load(None, {
        "MQTT_URL": BROKER, "DATABASE_URL": database,
        "TOPIC_PREFIX": prefix, "API_KEYS_FILE": str(keys_file),
        "MQTT_CLIENT_ID": f"webhooks-{prefix}", "ALERT_RULES_FILE": str(rules),
        "CALLBACK_URL_ALLOW": "127.0.0.1/32", **more})
    async with CallbackServer(settings) as server, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=server.app), base_url="http://cb",
            timeout=10) as client:
        yield Env(server, client, keys)


@dataclass
class Receiver:
    """Records every POST (headers, raw body); the first ``fail`` answer 500."""

    fail: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append((dict(request.headers), body))
        return Response(status_code=500 if len(self.requests) <= self.fail else 204)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    def taken(self) -> list[dict[str, Any]]:
        """Bodies of the requests answered 2xx."""
        return [json.loads(b) for _, b in self.requests[self.fail:]]


async def commit(server: CallbackServer, *envs: Envelope) -> None:
    """Through the real batch writer: stored, then told to the committed-batch hooks."""
    loop = asyncio.get_running_loop()
    done = [loop.create_future() for _ in envs]
    for env, future in zip(envs, done, strict=True):
        server.writer.submit(f"org/{env.org}/device/{env.gateway}/{env.channel}", env,
                             future.set_result)
    settled: list[Settled] = await asyncio.wait_for(asyncio.gather(*done), 10)
    assert all(s.reason is None for s in settled), settled


def envelope(org: str, channel: str, type_: str, data: dict[str, Any],
             device: str = "SN1") -> Envelope:
    now = time.time()
    return Envelope(id=uuid.uuid4().hex, type=type_, org=org, device=device, gateway="gw1",
                    ts=now, received_at=now, data=data, channel=channel)


def error_event(org: str) -> Envelope:
    return envelope(org, "event", "robotErrorNotice", {
        "event_id": uuid.uuid4().hex[:12], "event_level": "error",
        "event_type": "LostLocalization", "event_detail": "lost"})


def failed_run(org: str, status: str = "failed") -> Envelope:
    now = time.time()
    return envelope(org, "poll", "poll.run", {
        "run_id": uuid.uuid4().hex[:12], "status": status, "started_at": now - 5,
        "ended_at": now, "error": "pudu cloud answered 500", "shops_failed": []},
        device="gw1")


async def test_each_subscribed_event_once_signed_with_retries_logged_and_no_other_org(
        env: Env) -> None:
    pg, other = Receiver(fail=2), Receiver()
    async with serve(pg.app()) as pg_url, serve(other.app()) as other_url:
        events = ["robot.error", "run.failed"]
        made = await env.client.post("/webhooks", headers=env.auth("op_pg"),
                                     json={"url": f"{pg_url}/hook", "events": events})
        assert made.status_code == 200, made.text
        hook = made.json()
        assert hook["orgs"] == ["pg"] and len(hook["secret"]) >= 32
        theirs = await env.client.post("/api/v1/webhooks", headers=env.auth("op_other"),
                                       json={"url": f"{other_url}/hook", "events": events})
        assert theirs.status_code == 200, theirs.text
        assert theirs.json()["orgs"] == ["other"]

        # pg's robot error, pg's failed run, and a status change nobody subscribed to;
        # then the error redelivered by the broker (stored as a duplicate) and, after it,
        # another failed run: a second robot.error would arrive before that (one worker
        # per webhook keeps order)
        fault, run = error_event("pg"), failed_run("pg")
        await commit(env.server, fault, run,
                     envelope("pg", "status", "robotStatus", {"status": "offline"}))
        await commit(env.server, fault)
        await commit(env.server, failed_run("pg"))
        await eventually_async(lambda: len(pg.taken()) >= 3)
        await eventually_async(lambda: env.server.webhooks.delivery.pending == 0)

        assert [b["event"] for b in pg.taken()] == ["robot.error", "run.failed", "run.failed"]
        got = pg.taken()[:2]
        error = next(b for b in got if b["event"] == "robot.error")
        assert error["data"]["level"] == "error" and error["data"]["robot_sn"] == "SN1"
        assert error["org_id"] == "pg" and error["webhook_id"] == hook["id"]
        for headers, body in pg.requests:
            assert verify_signature(body, headers.get("x-signature"), hook["secret"])
            assert not verify_signature(body, headers.get("x-signature"), "another secret")
        assert other.requests == []

        log = await env.client.get(f"/webhooks/{hook['id']}/deliveries",
                                   headers=env.auth("op_pg"))
        assert log.status_code == 200
        rows = sorted(log.json()["items"], key=lambda r: r["id"])
        first = [(r["attempt"], r["status"], r["outcome"]) for r in rows
                 if r["event"] == got[0]["event"]]
        assert first == [(1, 500, "failed"), (2, 500, "failed"), (3, 204, "delivered")]
        later = [(r["attempt"], r["status"], r["outcome"]) for r in rows
                 if r["event"] == got[1]["event"]]
        assert later == [(1, 204, "delivered")] * 2
        assert all(isinstance(r["latency_ms"], float) and r["latency_ms"] >= 0 for r in rows)
        assert log.json()["next_cursor"] is None
        paged, cursor = [], None  # two at a time: the same rows, newest first
        while True:
            page = (await env.client.get(f"/api/v1/webhooks/{hook['id']}/deliveries",
                                         headers=env.auth("op_pg"),
                                         params={"limit": 2, **({"cursor": cursor}
                                                                if cursor else {})})).json()
            paged += page["items"]
            if (cursor := page["next_cursor"]) is None:
                break
        assert paged == log.json()["items"] and len(paged) == 5

        # another org's webhook does not exist for this key, on either path
        for path in (f"/webhooks/{theirs.json()['id']}/deliveries",
                     f"/api/v1/webhooks/{theirs.json()['id']}/deliveries"):
            r = await env.client.get(path, headers=env.auth("op_pg"))
            assert r.status_code == 404, r.text
        empty = await env.client.get(f"/webhooks/{theirs.json()['id']}/deliveries",
                                     headers=env.auth("op_other"))
        assert empty.json()["items"] == []


async def test_api_v1_answers_the_same_and_scopes_by_key(env: Env) -> None:
    body = {"url": "http://127.0.0.1:9/hook", "events": ["robot.offline"]}
    a = await env.client.post("/api/v1/webhooks", headers=env.auth("op_pg"), json=body)
    b = await env.client.post("/webhooks", headers=env.auth("op_other"), json=body)
    assert a.status_code == b.status_code == 200
    for path in ("/webhooks", "/api/v1/webhooks"):
        mine = await env.client.get(path, headers=env.auth("op_pg"))
        assert [h["id"] for h in mine.json()["items"]] == [a.json()["id"]]
        assert "secret" not in mine.json()["items"][0]
        every = await env.client.get(path, headers=env.auth("admin"))
        assert {h["id"] for h in every.json()["items"]} == {a.json()["id"], b.json()["id"]}
    viewer = await env.client.post("/webhooks", headers=env.auth("viewer_pg"), json=body)
    assert viewer.status_code == 403
    unknown = await env.client.post("/webhooks", headers=env.auth("op_pg"),
                                    json={**body, "events": ["robot.exploded"]})
    assert unknown.status_code == 422 and "robot.exploded" in unknown.text
    foreign = await env.client.post("/webhooks", headers=env.auth("op_pg"),
                                    json={**body, "orgs": ["other"]})
    assert foreign.status_code in (403, 404)
    gone = await env.client.delete(f"/api/v1/webhooks/{b.json()['id']}",
                                   headers=env.auth("op_pg"))
    assert gone.status_code == 404
    ok = await env.client.delete(f"/webhooks/{b.json()['id']}", headers=env.auth("op_other"))
    assert ok.status_code == 200
    left = await env.client.get("/api/v1/webhooks", headers=env.auth("admin"))
    assert [h["id"] for h in left.json()["items"]] == [a.json()["id"]]


async def test_a_private_address_is_refused_at_post_without_connecting(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    connects: list[str] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def counted(self: httpcore.AnyIOBackend, host: str, port: int,
                      *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        connects.append(host)
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", counted)
    for host in ("10.0.0.7", "192.168.1.1", "169.254.169.254", "[::1]", "127.0.0.2"):
        for path in ("/webhooks", "/api/v1/webhooks"):
            r = await env.client.post(path, headers=env.auth("admin"), json={
                "url": f"http://{host}/hook", "events": ["robot.error"]})
            assert r.status_code == 422, (host, r.text)
            assert r.json()["field"] == "url" and "CALLBACK_URL_ALLOW" in r.json()["message"]
    listed = await env.client.get("/webhooks", headers=env.auth("admin"))
    assert listed.json()["items"] == [] and connects == []


async def test_presence_status_and_alert_transitions_become_events(env: Env) -> None:
    """Gateway presence over the real broker, a robot going offline through the batch
    writer, and the alert a failed run opens (poll_failed) reach a subscriber of them."""
    from bridge.topic import TopicScheme

    receiver = Receiver()
    async with serve(receiver.app()) as url:
        made = await env.client.post("/webhooks", headers=env.auth("op_pg"), json={
            "url": f"{url}/hook", "events": ["gateway.offline", "robot.offline",
                                             "robot.status_changed", "alert.opened"]})
        assert made.status_code == 200, made.text
        secret = made.json()["secret"]
        await eventually_async(lambda: env.server.subscribed)
        topic = str(TopicScheme("pg", env.server.settings.topic_prefix).device("gw9",
                                                                              "presence"))
        await env.server.transport.publish(topic, b"offline", qos=1, retain=False)
        await commit(env.server, envelope("pg", "status", "robotStatus", {"status": "offline"}),
                     failed_run("pg"))

        def events() -> list[tuple[str, str]]:
            bodies = [json.loads(b) for _, b in receiver.requests]
            return sorted((b["event"], b["data"].get("rule") or b["data"].get("robot_sn")
                           or b["data"].get("gateway_id")) for b in bodies)

        # each also opens an alert: gateway_offline, robot_offline, poll_failed
        want = [("alert.opened", "gateway_offline"), ("alert.opened", "poll_failed"),
                ("alert.opened", "robot_offline"), ("gateway.offline", "gw9"),
                ("robot.offline", "SN1"), ("robot.status_changed", "SN1")]
        await eventually_async(lambda: len(receiver.requests) >= len(want))
        await eventually_async(lambda: env.server.webhooks.delivery.pending == 0)
        assert events() == want
        assert all(verify_signature(b, h.get("x-signature"), secret)
                   for h, b in receiver.requests)
        # the same status again is no change: only the later change to online is sent
        # (one worker per webhook keeps order, so a wrong offline would come first)
        await commit(env.server, envelope("pg", "status", "robotStatus", {"status": "offline"}))
        await commit(env.server, envelope("pg", "status", "robotStatus", {"status": "online"}))
        await eventually_async(lambda: len(receiver.requests) > len(want))
        last = json.loads(receiver.requests[len(want)][1])
        assert (last["event"], last["data"]["status"], last["data"]["previous"]) == (
            "robot.status_changed", "online", "offline")


@contextlib.asynccontextmanager
async def server_on(tmp_path: Path, database: str, prefix: str,
                    **more: str) -> AsyncIterator[Env]:
    """``start`` as a context: one server's life (a restart is a second one)."""
    async for e in start(tmp_path, database, prefix, **more):
        yield e


def made_dir(path: Path) -> Path:
    path.mkdir()
    return path


@contextlib.contextmanager
def either_database(tmp_path: Path, kind: str) -> Iterator[str]:
    """A database URL that outlives the servers built on it (SQLite file or MariaDB)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'cb.db'}"
    else:
        with scratch_mysql_database() as url:
            yield url


async def presence(server: CallbackServer, gateway: str, state: str) -> None:
    """The gateway's presence as an edge agent publishes it: retained (the last will too)."""
    from bridge.topic import TopicScheme

    topic = str(TopicScheme("pg", server.settings.topic_prefix).device(gateway, "presence"))
    await server.transport.publish(topic, state.encode(), qos=1, retain=True)


def settled(server: CallbackServer, **states: str) -> bool:
    """The server has received each gateway's presence in ``states``, judged every
    presence it received and delivered every event (presences are judged in order)."""
    return (all(server.gateways.get(f"pg/{gw}", {}).get("state") == state
                for gw, state in states.items())
            and server.webhooks.presence.pending == 0
            and server.webhooks.delivery.pending == 0)


def told(receiver: Receiver, since: int = 0) -> list[tuple[str, str, str | None]]:
    """(event, gateway, previous) of the gateway events received since ``since``."""
    bodies = [json.loads(b) for _, b in receiver.requests[since:]]
    return [(b["event"], b["data"]["gateway_id"], b["data"].get("previous")) for b in bodies]


@pytest.mark.parametrize("kind", ["sqlite", "mysql"])
async def test_a_restart_tells_no_gateway_online_again(tmp_path: Path, kind: str) -> None:
    """Gateways online and offline before a restart: their retained presence, received
    again by the restarted server, raises nothing; the offline one coming online after
    it raises gateway.online (previous: offline)."""
    receiver = Receiver()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with either_database(tmp_path, kind) as database:
        async with serve(receiver.app()) as url:
            try:
                async with server_on(tmp_path, database, prefix) as first:
                    await first.server.webhooks.store.add(
                        f"{url}/hook", ["gateway.online", "gateway.offline"], ["pg"], "admin",
                        time.time())
                    await eventually_async(lambda: first.server.subscribed)
                    await presence(first.server, "gwA", "online")
                    await presence(first.server, "gwB", "offline")
                    await eventually_async(
                        lambda: settled(first.server, gwA="online", gwB="offline"))
                assert sorted(told(receiver)) == [("gateway.offline", "gwB", None),
                                                  ("gateway.online", "gwA", None)]
                before = len(receiver.requests)
                async with server_on(tmp_path, database, prefix) as second:
                    # the broker hands the restarted server both retained presences
                    await eventually_async(
                        lambda: settled(second.server, gwA="online", gwB="offline"))
                    assert told(receiver, before) == []
                    await presence(second.server, "gwB", "online")
                    await eventually_async(lambda: settled(second.server, gwB="online"))
                    assert told(receiver, before) == [("gateway.online", "gwB", "offline")]
            finally:
                async with server_on(tmp_path, database, prefix) as last:
                    for gateway in ("gwA", "gwB"):  # clear the retained messages
                        await presence(last.server, gateway, "")


async def test_a_presence_received_before_the_one_told_changes_nothing(
        tmp_path: Path) -> None:
    """A replica far behind judges an old "offline" after another told a newer "online":
    the stored presence and the subscribers keep the newer."""
    from callback_server.store import open_store
    from callback_server.webhooks.store import WebhookStore

    async with open_store(f"sqlite:///{tmp_path / 'p.db'}") as s:
        await s.migrate()
        hooks = WebhookStore(s)
        assert await hooks.presence("pg", "gw", "online", 300.0) == (True, None)
        assert await hooks.presence("pg", "gw", "offline", 200.0) == (False, "online")
        assert await hooks.presence("pg", "gw", "online", 310.0) == (False, "online")
        assert await hooks.presence("pg", "gw", "offline", 400.0) == (True, "online")


async def test_replicas_tell_a_presence_change_once(tmp_path: Path) -> None:
    """Two replicas on one database, each receiving every presence (as each does on its
    own subscription beside the SHARE_GROUP one): each change is told once, not once per
    replica."""
    receiver = Receiver()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    want: list[tuple[str, str, str | None]] = []
    with scratch_mysql_database() as database:
        async with serve(receiver.app()) as url, \
                server_on(made_dir(tmp_path / "a"), database, prefix,
                          MQTT_CLIENT_ID=f"a-{prefix}", SHARE_GROUP=prefix) as a, \
                server_on(made_dir(tmp_path / "b"), database, prefix,
                          MQTT_CLIENT_ID=f"b-{prefix}", SHARE_GROUP=prefix) as b:
            await a.server.webhooks.store.add(
                f"{url}/hook", ["gateway.online", "gateway.offline"], ["pg"], "admin",
                time.time())
            await eventually_async(lambda: a.server.subscribed and b.server.subscribed)

            def everywhere(state: str) -> bool:
                return all(settled(r.server, gwR=state) for r in (a, b))

            try:
                previous = None
                for state in ("online", "offline", "online"):
                    await presence(a.server, "gwR", state)
                    await eventually_async(partial(everywhere, state))
                    want.append((f"gateway.{state}", "gwR", previous))
                    previous = state
                    assert told(receiver) == want
            finally:
                await presence(a.server, "gwR", "")


async def test_a_partial_run_is_run_partial_and_opens_poll_failed(env: Env) -> None:
    """A one-shop run whose every robot failed ends partial (shops_failed empty): a
    subscriber of run.partial hears of it, with the alert it opens; one of run.failed only
    hears nothing of it."""
    partial, failed_only = Receiver(), Receiver()
    async with serve(partial.app()) as url, serve(failed_only.app()) as other:
        for where, events in ((url, ["run.partial", "alert.opened"]), (other, ["run.failed"])):
            made = await env.client.post("/webhooks", headers=env.auth("op_pg"), json={
                "url": f"{where}/hook", "events": events})
            assert made.status_code == 200, made.text
        await commit(env.server, failed_run("pg", "partial"))
        await eventually_async(lambda: len(partial.requests) >= 2)
        await eventually_async(lambda: env.server.webhooks.delivery.pending == 0)
        got = sorted((b["event"], b["data"].get("rule") or b["data"].get("status"))
                     for b in partial.taken())
        assert got == [("alert.opened", "poll_failed"), ("run.partial", "partial")]
        run = next(b for b in partial.taken() if b["event"] == "run.partial")
        assert run["data"]["shops_failed"] == [] and run["data"]["gateway_id"] == "gw1"
        assert failed_only.requests == []


async def test_delivery_to_an_address_the_rule_no_longer_allows_is_refused_unconnected(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A webhook made while CALLBACK_URL_ALLOW listed its host, delivered after the
    operator narrowed it: refused at connect, logged once, never retried or connected."""
    from bridge.http.outbound import OutboundPolicy
    from callback_server.signed_post import Retry
    from callback_server.webhooks import Event, WebhookDelivery

    connects: list[str] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def counted(self: httpcore.AnyIOBackend, host: str, port: int,
                      *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        connects.append(host)
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", counted)
    store = env.server.webhooks.store
    hook = await store.add("http://127.0.0.1:9/hook", ["robot.error"], ["pg"], "admin",
                           time.time())
    async with WebhookDelivery(store, OutboundPolicy(), Retry(3, 0.01, 0.02), 5) as narrowed:
        outcome = await narrowed.deliver(hook, Event("robot.error", "pg", {"robot_sn": "SN1"}))
    assert outcome == "refused" and connects == []
    items, _ = await store.deliveries(hook.id, limit=10)
    assert [(r["attempt"], r["status"], r["outcome"]) for r in items] == [(1, None, "refused")]
