"""The edge agent's admin listener as its callers meet it: one token check for the REST
MQTT proxy and the ``/pudu/*`` routes, what ``/mqtt/*`` answers with the proxy off, and
the 409 of a poll with no shops. In process, on the memory broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from edge_agent import settings as edge_config
from edge_agent.service import EdgeAgent
from tests.support.procs import free_port

TOKEN = "admin-token-" + uuid.uuid4().hex


@asynccontextmanager
async def admin(tmp_path: Path, **env: str) -> AsyncIterator[httpx.AsyncClient]:
    """An entered edge agent (Pudu configured, no shops) and a client of its admin app."""
    settings = edge_config.load(None, {
        "PUDU_CALLBACK_CODE": "code", "MQTT_URL": f"mqtt://a{uuid.uuid4().hex[:8]}",
        "MQTT_BACKEND": "memory", "ORG_ID": "acme", "GATEWAY_ID": "gw1",
        "OUTBOX_PATH": str(tmp_path / "outbox.db"),
        # a closed loopback port: nothing is ever asked of it here
        "PUDU_API_URL": f"http://127.0.0.1:{free_port()}", "PUDU_API_KEY": "k",
        "PUDU_API_SECRET": "s", "PUDU_POLL_INTERVAL": "0", **env})
    async with EdgeAgent(settings) as agent, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=agent.admin_app), base_url="http://admin") as c:
        yield c


@pytest.mark.parametrize(("authorization", "status"), [
    (f"Bearer {TOKEN}", 200),
    (f"bearer {TOKEN}", 200),    # RFC 7235: the scheme is case-insensitive
    (f"BEARER  {TOKEN}", 200),
    (TOKEN, 401),                # no scheme: refused
    (f"Basic {TOKEN}", 401),
    (f"Bearer {TOKEN}x", 401),
    ("Bearer", 401),
    (None, 401),
])
async def test_every_admin_route_takes_the_token_the_same_way(
        tmp_path: Path, authorization: str | None, status: int) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with admin(tmp_path, PROXY_TOKEN=TOKEN) as client:
        answers = {path: await client.get(path, headers=headers)
                   for path in ("/mqtt/status", "/pudu/runs")}
    assert {p: r.status_code for p, r in answers.items()} == {
        "/mqtt/status": status, "/pudu/runs": status}
    for answer in answers.values():
        if status == 401:
            assert answer.json()["message"] == "missing or invalid bearer token"
            assert answer.headers["www-authenticate"] == "Bearer"


async def test_without_a_token_the_pudu_routes_are_open_and_the_proxy_says_it_is_off(
        tmp_path: Path) -> None:
    async with admin(tmp_path) as client:
        runs = await client.get("/pudu/runs")
        off = [await client.request(method, path, json={"topic": "org/acme/x"})
               for method, path in (("POST", "/mqtt/subscribe"), ("GET", "/mqtt/status"),
                                    ("POST", "/mqtt/publish"), ("GET", "/mqtt/"))]
        schema = (await client.get("/openapi.json")).json()
    assert runs.status_code == 200
    for answer in off:
        assert answer.status_code == 404, answer.text
        body = answer.json()
        assert body["status"] == "error" and set(body) <= {"status", "message", "timestamp"}
        assert "REST MQTT proxy is off" in body["message"]
        assert "set PROXY_TOKEN" in body["message"]
    assert not [p for p in schema["paths"] if p.startswith("/mqtt")]


async def test_with_the_proxy_on_its_own_404_and_405_stand(tmp_path: Path) -> None:
    async with admin(tmp_path, PROXY_TOKEN=TOKEN) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        unknown = await client.get("/mqtt/nothing-here", headers=auth)
        wrong_method = await client.get("/mqtt/publish", headers=auth)
    assert unknown.status_code == 404 and "proxy is off" not in unknown.text
    assert wrong_method.status_code == 405


async def test_a_poll_with_no_shops_is_a_declared_409(tmp_path: Path) -> None:
    async with admin(tmp_path, PROXY_TOKEN=TOKEN) as client:
        answer = await client.post("/pudu/poll", headers={"Authorization": f"Bearer {TOKEN}"})
        declared = (await client.get("/openapi.json")).json()["paths"]["/pudu/poll"]["post"]
    assert answer.status_code == 409 and answer.json()["field"] == "PUDU_SHOP_IDS"
    assert "409" in declared["responses"]


def test_the_enable_callbacks_warning_names_what_turns_the_proxy_on(tmp_path: Path) -> None:
    settings = edge_config.load(None, {
        "PUDU_CALLBACK_CODE": "code", "ORG_ID": "acme", "GATEWAY_ID": "gw1",
        "OUTBOX_PATH": str(tmp_path / "outbox.db"), "ENABLE_CALLBACKS": "true"})
    [warning] = [w for w in settings.source_warnings if w.startswith("ENABLE_CALLBACKS")]
    assert "PROXY_TOKEN" in warning and "API_KEYS_FILE" in warning
    assert "always on" not in warning
