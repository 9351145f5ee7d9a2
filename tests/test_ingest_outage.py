"""HTTP ingest and Pudu webhooks while the database is away (a private MariaDB stopped
and started by PID): 503 + Retry-After, nothing answered 200 lost, and what waits for
the database bounded however often the senders retry."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pymysql
import pytest

from callback_server import ingest as ingest_route
from callback_server import pudu_webhook
from callback_server import settings as cb_config
from callback_server.service import CallbackServer
from tests.support.dbutil import query
from tests.support.mariadb_proc import MariadbProcess
from tests.support.waiting import eventually_async

RULE = "rule-token"
CAP = 250


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariadbProcess]:
    with MariadbProcess(tmp_path_factory.mktemp("mariadb")) as db:
        yield db


def fresh_database(db: MariadbProcess) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host="127.0.0.1", port=db.port, user="root", password="")
    with conn:
        conn.cursor().execute(f"CREATE DATABASE `{name}`")
    return db.url.rsplit("/", 1)[0] + f"/{name}"


@asynccontextmanager
async def serving(url: str, **env: str) -> AsyncIterator[tuple[CallbackServer,
                                                               httpx.AsyncClient]]:
    settings = cb_config.load(None, {
        "MQTT_URL": f"mqtt://b{uuid.uuid4().hex[:8]}", "MQTT_BACKEND": "memory",
        "DATABASE_URL": url, "CALLBACK_TOKEN": RULE, **env})
    async with CallbackServer(settings) as server, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=server.app), base_url="http://cb") as client:
        yield server, client


def envelope(i: int) -> dict[str, Any]:
    sn = f"R{i % 50}"
    return {"v": 1, "id": f"m{i}", "type": "notifyRobotPower", "channel": "power",
            "org": "acme", "device": sn, "gateway": "gw", "ts": 1_780_000_000 + i,
            "data": {"battery_level": i % 100}, "raw": {"sn": sn},
            "topic": f"org/acme/device/{sn}/power"}


async def test_the_same_300_messages_retried_3000_times_stay_under_the_cap(
        mariadb: MariadbProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    url = fresh_database(mariadb)
    batches = [json.dumps([envelope(b * 10 + k) for k in range(10)]) for b in range(30)]
    async with serving(url, INGEST_PENDING_MAX=str(CAP)) as (server, client):
        async def post(body: str) -> httpx.Response:
            return await client.post("/callback/messages", content=body,
                                     headers={"X-Callback-Token": RULE})

        first = await post(batches[0])
        assert first.json()["stored"] == 10, first.text
        # The rule's 3 s deadline, shortened so 3,000 requests take seconds, not hours.
        monkeypatch.setattr(ingest_route, "INGEST_TIMEOUT_SECONDS", 0.05)
        mariadb.stop()
        peak = 0
        for _ in range(100):  # 100 rounds of the 30 batches: 3,000 requests
            answers = await asyncio.gather(*(post(body) for body in batches))
            for r in answers:
                assert r.status_code == 503 and r.headers["retry-after"], r.text
            peak = max(peak, server.writer.held, server.writer.pending)
        assert peak == CAP  # 290 messages wait to be stored; only the cap's worth is held
        assert server.writer.joined > 20_000 and server.writer.refused_full > 0
        assert (await server.health())["ingest_pending"] == CAP

        mariadb.start()
        left = list(range(30))

        async def retry() -> list[int]:  # the rule retries every 503, as after Retry-After
            answers = await asyncio.gather(*(post(batches[b]) for b in left))
            left[:] = [b for b, r in zip(left, answers, strict=True) if r.status_code != 200]
            return left

        await eventually_async(retry, accept=lambda batches: not batches, within=60,
                               every=0.05, what="every batch answered 200")
        assert server.writer.held == 0
    logged = query(url, "SELECT id FROM mqtt_message_log")
    assert sorted(r["id"] for r in logged) == sorted(f"m{i}" for i in range(300))


def callback(org: str, i: int) -> dict[str, Any]:
    return {"callback_type": "notifyRobotPower",
            "data": {"sn": f"{org}-R{i % 20}", "power": i % 100,
                     "notify_timestamp": 1_780_000_000_000 + i * 1000}}


async def test_pudu_webhooks_with_the_database_stopped_lose_nothing_answered_200(
        mariadb: MariadbProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    url = fresh_database(mariadb)
    codes = {"acme": "code-of-acme-0123456789abcdef", "beta": "code-of-beta-0123456789abcdef"}
    calls = [(org, i) for i in range(90) for org in codes]
    async with serving(url, CALLBACK_CODES=",".join(f"{c}={o}" for o, c in codes.items())) \
            as (_, client):
        async def send(org: str, i: int) -> httpx.Response:
            return await client.post("/api/pudu/webhook", json=callback(org, i),
                                     headers={"CallbackCode": codes[org]})

        answered: dict[tuple[str, int], httpx.Response] = {}

        async def wave(part: list[tuple[str, int]]) -> None:
            for j in range(0, len(part), 10):
                chunk = part[j:j + 10]
                for call, r in zip(chunk, await asyncio.gather(*(send(*c) for c in chunk)),
                                   strict=True):
                    answered[call] = r

        await wave(calls[:60])  # database up
        assert all(r.status_code == 200 for r in answered.values())
        monkeypatch.setattr(pudu_webhook, "WEBHOOK_TIMEOUT_SECONDS", 0.5)
        stopping = asyncio.get_running_loop().run_in_executor(None, mariadb.stop)
        await wave(calls[60:120])  # while it stops
        await stopping
        await wave(calls[120:])  # stopped
        ok = {call for call, r in answered.items() if r.status_code == 200}
        refused = [r for r in answered.values() if r.status_code != 200]
        assert len(ok) >= 60 and refused, "the database never looked stopped"
        for r in refused:
            assert r.status_code == 503 and r.headers["retry-after"], r.text
        ids = {answered[call].json()["data"]["message_id"] for call in ok}

        mariadb.start()
        logged = {r["id"] for r in query(url, "SELECT id FROM mqtt_message_log")}
        assert ids <= logged, f"{len(ids - logged)} callbacks answered 200 are not stored"
        left = [call for call in calls if call not in ok]

        async def retry() -> int:  # Pudu retries what was not answered 200
            answers = await asyncio.gather(*(send(*call) for call in left))
            left[:] = [c for c, r in zip(left, answers, strict=True) if r.status_code != 200]
            return len(left)

        await eventually_async(retry, accept=lambda unanswered: unanswered == 0, within=60,
                               every=0.05, what="every callback answered 200")
    rows = query(url, "SELECT robot_sn, org_id, gateway_id FROM mnt_robots_management")
    assert len(rows) == 40
    assert all(r["robot_sn"].startswith(f"{r['org_id']}-") and r["gateway_id"] == "cloud"
               for r in rows), rows
    assert len(query(url, "SELECT id FROM mqtt_message_log")) == len(calls)
