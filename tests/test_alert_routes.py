"""Alert routes and webhook delivery over HTTP, in process: the outbound rule at subscribe,
the delivery log when a receiver never takes a transition, ``/alerts`` cursor paging, and
docs/alerts.md's chat relay for alert webhooks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.proxy import sign
from callback_server import settings as cb_config
from callback_server.alerts import Subject
from callback_server.keys import ALL_ORGS, add_key
from callback_server.service import CallbackServer
from tests.support.waiting import eventually_async
from tests.test_outbound import REFUSED_HOSTS
from tests.test_proxy import BROKER, serve

pytestmark = pytest.mark.integration


@dataclass
class Env:
    server: CallbackServer
    client: httpx.AsyncClient
    keys: dict[str, str]

    def auth(self, who: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


async def start(tmp_path: Path, **extra: str) -> AsyncIterator[Env]:
    keys_file = tmp_path / "keys.yaml"
    keys = {"admin": add_key(keys_file, "admin", [ALL_ORGS], "admin"),
            "viewer_pg": add_key(keys_file, "viewer_pg", ["pg"], "viewer")}
    rules = tmp_path / "alert-rules.yaml"
    rules.write_text("delivery: {attempts: 3, base_seconds: 0.01, cap_seconds: 0.02}\n")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    settings = cb_config.load(None, {
        "MQTT_URL": BROKER, "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}",
        "TOPIC_PREFIX": prefix, "API_KEYS_FILE": str(keys_file),
        "MQTT_CLIENT_ID": f"alert-routes-{prefix}", "ALERT_RULES_FILE": str(rules), **extra})
    async with CallbackServer(settings) as server, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=server.app), base_url="http://cb",
            timeout=10) as client:
        yield Env(server, client, keys)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """No CALLBACK_URL_ALLOW: only globally routable hosts may be subscribed."""
    async for e in start(tmp_path):
        yield e


@pytest.fixture
async def loopback_env(tmp_path: Path) -> AsyncIterator[Env]:
    """CALLBACK_URL_ALLOW=127.0.0.1/32, so a receiver the test runs can be reached."""
    async for e in start(tmp_path, CALLBACK_URL_ALLOW="127.0.0.1/32"):
        yield e


class Receiver:
    """A loopback webhook receiver: ``/down`` answers 503, ``/gone`` 410; counts requests."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def hook(self, request: Request) -> Response:
        await request.body()
        self.paths.append(request.url.path)
        return Response(status_code=503 if request.url.path == "/down" else 410)

    def app(self) -> Starlette:
        return Starlette(routes=[Route(p, self.hook, methods=["POST"])
                                 for p in ("/down", "/gone")])


async def test_subscribing_a_non_global_address_is_refused_and_never_connected(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    connects: list[str] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def counted(self: httpcore.AnyIOBackend, host: str, port: int,
                      *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        connects.append(host)
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", counted)
    receiver = Receiver()
    async with serve(receiver.app()) as url:
        port = url.rsplit(":", 1)[1]
        for host in [*REFUSED_HOSTS, f"127.0.0.1:{port}", f"localhost:{port}"]:
            r = await env.client.post("/alert-subscriptions", headers=env.auth(),
                                      json={"url": f"http://{host}/down"})
            assert r.status_code == 422, (host, r.text)
            assert "CALLBACK_URL_ALLOW" in r.text and "url" in r.text
        listed = await env.client.get("/alert-subscriptions", headers=env.auth())
        assert listed.json()["items"] == []
    assert connects == [] and receiver.paths == []  # judged by address, not by trying


async def test_a_receiver_that_never_takes_it_is_given_up_at_the_attempt_bound(
        loopback_env: Env) -> None:
    env = loopback_env
    receiver = Receiver()
    async with serve(receiver.app()) as url:
        subs = {}
        for path in ("/down", "/gone"):
            r = await env.client.post("/alert-subscriptions", headers=env.auth(),
                                      json={"url": url + path})
            assert r.status_code == 200, r.text
            subs[path] = r.json()["id"]
        opened = await env.server.alert_store.open(
            Subject("battery_low", "pg", "robot", "D1"), "high", {}, time.time())
        assert opened is not None
        env.server.alert_delivery.submit(opened)

        await eventually_async(lambda: env.server.alert_delivery.failed == 2)  # both given up

        async def log(path: str) -> list[tuple[int, str]]:
            r = await env.client.get(f"/alert-subscriptions/{subs[path]}/deliveries",
                                     headers=env.auth())
            return [(d["attempt"], d["outcome"]) for d in reversed(r.json()["items"])]

        # attempts: 3. A 503 is retried up to the bound; a 410 will not change: one try.
        assert await log("/down") == [(1, "failed"), (2, "failed"), (3, "gave_up")]
        assert await log("/gone") == [(1, "gave_up")]
        assert sorted(receiver.paths) == ["/down"] * 3 + ["/gone"]
        health = (await env.client.get("/callback/health", headers=env.auth())).json()
        assert health["alerts"]["undelivered"] == 2


async def test_alerts_page_by_cursor_over_http_without_gaps_or_repeats(env: Env) -> None:
    store = env.server.alert_store
    # Opened a minute ago, well within robot_fault's clear_seconds: the engine's sweep,
    # which may run while the test does, clears older faults.
    start = time.time() - 60
    for i in range(7):  # pairs share opened_at: the id breaks the tie
        await store.open(Subject("robot_fault", "pg", "robot", f"P{i}"), "high", {},
                         start + i // 2)
    for i in range(3):
        await store.open(Subject("robot_fault", "other", "robot", f"O{i}"), "high", {},
                         start + i)
    resolved = await store.resolve(Subject("robot_fault", "pg", "robot", "P6"), time.time())
    assert resolved is not None

    async def walk(who: str, **params: Any) -> list[list[str]]:
        pages, cursor = [], None
        while True:
            q = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
            r = await env.client.get("/alerts", params=q, headers=env.auth(who))
            assert r.status_code == 200, r.text
            body = r.json()
            pages.append([x["subject_id"] for x in body["items"]])
            cursor = body["next_cursor"]
            if cursor is None:
                return pages
            assert len(pages) < 20, "the cursor does not advance"

    everything = [sn for page in await walk("admin") for sn in page]
    assert len(everything) == len(set(everything)) == 10
    pg = await walk("admin", org="pg")
    assert [len(p) for p in pg] == [2, 2, 2, 1]
    ordered = await store.page(limit=100, org="pg")
    assert [sn for p in pg for sn in p] == [a.subject_id for a in ordered[0]]  # newest first
    assert sorted(sn for p in await walk("viewer_pg") for sn in p) == [
        f"P{i}" for i in range(7)]  # a viewer's pages hold its org only
    open_pg = [sn for p in await walk("admin", org="pg", state="open") for sn in p]
    assert sorted(open_pg) == [f"P{i}" for i in range(6)]
    r = await env.client.get("/alerts", params={"cursor": "not-a-cursor"},
                             headers=env.auth())
    assert r.status_code == 422


def documented_relay() -> str:
    """The Slack relay docs/alerts.md shows, as printed there."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "alerts.md").read_text()
    start = text.index("```python\n# alert_relay.py") + len("```python\n")
    return text[start:text.index("```", start)]


async def test_the_documented_relay_posts_verified_alerts_to_slack_as_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slack: list[dict[str, Any]] = []
    slack_status = [200]

    async def incoming(request: Request) -> Response:
        slack.append(json.loads(await request.body()))
        return Response(status_code=slack_status[0])

    async with serve(Starlette(routes=[Route("/s", incoming, methods=["POST"])])) as url:
        secret = "s" * 32
        monkeypatch.setenv("ALERT_SECRET", secret)
        monkeypatch.setenv("SLACK_WEBHOOK_URL", url + "/s")
        module = tmp_path / "alert_relay.py"
        module.write_text(documented_relay())
        scope: dict[str, Any] = {"__name__": "alert_relay"}
        exec(compile(module.read_text(), str(module), "exec"), scope)
        alert = {"id": "a1", "rule": "robot_fault", "org": "acme", "subject_type": "robot",
                 "subject_id": "R1", "severity": "critical", "state": "open",
                 "transition": "opened", "transition_id": "t1"}
        body = json.dumps(alert).encode()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=scope["app"]),
                                     base_url="http://relay") as relay:
            forged = await relay.post("/alerts", content=body,
                                      headers={"X-Signature": sign("wrong" * 8, body)})
            assert forged.status_code == 401 and slack == []
            ok = await relay.post("/alerts", content=body,
                                  headers={"X-Signature": sign(secret, body)})
            assert ok.status_code == 200
            assert slack == [{"text": "[critical] robot_fault opened: robot R1 of acme"}]
            slack_status[0] = 500  # Slack down: the relay answers 5xx, so we retry
            again = await relay.post("/alerts", content=body,
                                     headers={"X-Signature": sign(secret, body)})
            assert again.status_code == 502
