"""The callback server's read API refuses an over-long ``sn``, ``cursor``, ``org``,
``gateway`` or ``status`` with a 422 naming it, before any work; a value at the bound is
served. And /callback/health shows its figures to exactly the keys the routes accept."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bridge.http.paging import encode_cursor
from bridge.topic import MAX_SN_BYTES
from callback_server import settings as cb_config
from callback_server.app import MAX_CURSOR_CHARS, MAX_ID_CHARS
from callback_server.keys import ALL_ORGS, add_key
from callback_server.service import CallbackServer


@dataclass
class Cloud:
    client: httpx.AsyncClient
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    keys_file = tmp_path / "keys.yaml"
    key = add_key(keys_file, "reader", [ALL_ORGS], "viewer")
    settings = cb_config.load(None, {
        "MQTT_BACKEND": "memory", "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}",
        "API_KEYS_FILE": str(keys_file)})
    async with CallbackServer(settings) as server:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cb",
                                     timeout=10) as client:
            yield Cloud(client, key)


LONG_SN = "s" * (MAX_SN_BYTES + 1)
#: Cursors of the right shape (each route would decode and use them), but longer than any
#: this API makes.
LONG = MAX_CURSOR_CHARS
ROBOTS_CURSOR = encode_cursor(["s" * LONG, "acme"])
EVENTS_CURSOR = encode_cursor([None, None, "e" * LONG])
HISTORY_CURSOR = base64.urlsafe_b64encode(b"[1." + b"0" * LONG + b"]").decode().rstrip("=")
CASES = [  # (url, the parameter the 422 names)
    (f"/robots/{LONG_SN}", "sn"),
    (f"/robots/{LONG_SN}/events", "sn"),
    (f"/robots/{LONG_SN}/history", "sn"),
    (f"/robots/{LONG_SN}/tasks", "sn"),
    (f"/robots?cursor={ROBOTS_CURSOR}", "cursor"),
    (f"/robots/r1/events?cursor={EVENTS_CURSOR}", "cursor"),
    (f"/robots/r1/history?cursor={HISTORY_CURSOR}", "cursor"),
    (f"/gateways?cursor={ROBOTS_CURSOR}", "cursor"),
    (f"/robots?org={'o' * (MAX_ID_CHARS + 1)}", "org"),
    (f"/robots?gateway={'g' * (MAX_ID_CHARS + 1)}", "gateway"),
    (f"/robots?status={'x' * 33}", "status"),
]


@pytest.mark.parametrize(("url", "name"), CASES)
async def test_an_over_long_parameter_is_a_422_naming_it(cloud: Cloud, url: str,
                                                         name: str) -> None:
    answer = await cloud.client.get(url, headers=cloud.auth)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == name
    assert name in answer.json()["message"]


async def test_values_at_the_bounds_are_served(cloud: Cloud) -> None:
    longest = encode_cursor(["s" * MAX_SN_BYTES, "o" * MAX_ID_CHARS])
    assert len(longest) < MAX_CURSOR_CHARS
    for url in ("/robots", "/gateways"):
        paged = await cloud.client.get(url, params={"cursor": longest}, headers=cloud.auth)
        assert paged.status_code == 200, paged.text
    sn = "s" * MAX_SN_BYTES
    assert (await cloud.client.get(f"/robots/{sn}", headers=cloud.auth)).status_code == 404
    listed = await cloud.client.get(
        "/robots", params={"org": "o" * MAX_ID_CHARS, "gateway": "g" * MAX_ID_CHARS,
                           "status": "x" * 32}, headers=cloud.auth)
    assert listed.status_code == 200 and listed.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(("header", "detailed"), [
    ("Bearer {key}", True), ("bearer  {key} ", True), ("{key}", False),
    ("Basic {key}", False), ("Bearer not-a-key", False), (None, False)])
async def test_health_shows_its_figures_to_the_keys_the_routes_take(
        cloud: Cloud, header: str | None, detailed: bool) -> None:
    headers = {} if header is None else {"Authorization": header.format(key=cloud.key)}
    health = (await cloud.client.get("/callback/health", headers=headers)).json()
    routes = (await cloud.client.get("/robots", headers=headers)).status_code
    assert ("uptime_seconds" in health or len(health) > 10) == detailed, sorted(health)
    assert (routes == 200) == detailed
