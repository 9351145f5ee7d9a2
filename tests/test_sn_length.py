"""A robot sn up to the longest the product accepts (MAX_SN_BYTES, 128) is stored and found
under itself, whichever way it arrives (an IoT Rule's POST /callback/messages, a Pudu
webhook posted to the callback server) and on either database; a longer one is refused
with its reason, never stored under a digest. An own table made 64 wide by an earlier
version is widened by ``migrate`` with its rows kept."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.pudu import normalize
from bridge.topic import MAX_SN_BYTES
from callback_server import settings as cb_config
from callback_server.service import CallbackServer
from callback_server.store import open_store
from tests.support.dbutil import query, scratch_mysql_database

RULE, ADMIN, CODE = "rule-token", "admin-token", "acme-code-0123456789abcdef0123456"
LONG_SN = "SN-" + "0123456789" * 9 + "-abcdefg"  # 100 bytes
TOO_LONG = "L" * (MAX_SN_BYTES + 1)
MAXIMUM = "M" * MAX_SN_BYTES


def pudu_bodies(sn: str) -> list[dict[str, Any]]:
    """A status and an error event of robot ``sn``, as Pudu posts them."""
    now = int(time.time())
    return [
        {"callback_type": "robotStatus", "data": {"sn": sn, "run_status": "ONLINE",
                                                  "timestamp": now - 1}},
        {"callback_type": "robotErrorWarning", "data": {
            "sn": sn, "error_level": "WARNING", "error_type": "LostLocalization",
            "error_detail": "OdomSlip", "error_id": f"vir_{now}", "timestamp": now}},
    ]


def envelopes(sn: str) -> list[dict[str, Any]]:
    """The same callbacks as the envelopes an edge agent publishes (and a Rule pushes)."""
    out = []
    for body in pudu_bodies("R0"):  # (normalize itself refuses an sn beyond the maximum)
        norm = normalize(body, received_at=time.time())
        norm.raw["sn"] = sn
        out.append({"v": 1, "id": norm.message_id, "type": norm.callback_type,
                    "channel": norm.channel, "org": "acme", "device": sn, "gateway": "gw-1",
                    "ts": norm.ts, "received_at": time.time(), "data": norm.data,
                    "raw": norm.raw})
    return out


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.integration)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cb.db'}"
        return
    with scratch_mysql_database() as url:
        yield url


@asynccontextmanager
async def callback_server(url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = cb_config.load(None, {
        "MQTT_URL": f"mqtt://b{uuid.uuid4().hex[:8]}", "MQTT_BACKEND": "memory",
        "DATABASE_URL": url, "CALLBACK_TOKEN": RULE, "PROXY_TOKEN": ADMIN,
        "CALLBACK_CODES": f"{CODE}=acme"})
    async with CallbackServer(settings) as server, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=server.app), base_url="http://cb") as client:
        yield client


async def found_under_itself(client: httpx.AsyncClient, sn: str) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    robot = await client.get(f"/robots/{sn}", headers=auth)
    assert robot.status_code == 200, robot.text
    assert (robot.json()["robot_sn"], robot.json()["status"]) == (sn, "online")
    events = (await client.get(f"/robots/{sn}/events", headers=auth)).json()["items"]
    assert [(e["robot_sn"], e["event_type"]) for e in events] == [(sn, "LostLocalization")]
    history = (await client.get(f"/robots/{sn}/history", headers=auth)).json()["items"]
    assert history and {h["robot_sn"] for h in history} == {sn}
    listed = (await client.get("/robots", headers=auth)).json()
    items = listed["items"] if isinstance(listed, dict) else listed
    assert [r["robot_sn"] for r in items] == [sn]


@pytest.mark.parametrize("sn", [LONG_SN, MAXIMUM], ids=["100 bytes", "128 bytes"])
async def test_a_long_sn_through_the_rule_ingest_is_found_under_itself(
        database: str, sn: str) -> None:
    async with callback_server(database) as client:
        body = envelopes(sn)
        for _ in range(5):  # as the IoT rule does: a 503 (not committed in time) is retried
            r = await client.post("/callback/messages", json=body,
                                  headers={"X-Callback-Token": RULE})
            if r.status_code != 503:
                break
        assert r.status_code == 200, r.text
        assert r.json()["stored"] + r.json()["duplicates"] == 2, r.json()
        await found_under_itself(client, sn)


@pytest.mark.parametrize("sn", [LONG_SN, MAXIMUM], ids=["100 bytes", "128 bytes"])
async def test_a_long_sn_through_the_cloud_webhook_is_found_under_itself(
        database: str, sn: str) -> None:
    async with callback_server(database) as client:
        for body in pudu_bodies(sn):
            r = await client.post("/api/pudu/webhook", json=body,
                                  headers={"CallbackCode": CODE})
            assert r.status_code == 200, r.text
        await found_under_itself(client, sn)


async def test_an_sn_beyond_the_maximum_is_refused_with_its_reason(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    async with callback_server(db) as client:
        r = await client.post("/callback/messages", json=envelopes(TOO_LONG)[:1],
                              headers={"X-Callback-Token": RULE})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert (answer["stored"], answer["dead_lettered"]) == (0, 1), answer
        reason = answer["results"][0]["reason"]
        assert reason.startswith("malformed: ") and f"{MAX_SN_BYTES} bytes" in reason, reason
        r = await client.post("/api/pudu/webhook", json=pudu_bodies(TOO_LONG)[0],
                              headers={"CallbackCode": CODE})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "data.sn"
        assert f"longer than {MAX_SN_BYTES} bytes" in r.json()["message"]
        listed = (await client.get("/robots", headers={"Authorization": f"Bearer {ADMIN}"}))
        assert TOO_LONG[:60] not in listed.text  # nothing stored under a shortened sn
    dead = query(db, "SELECT reason FROM mqtt_dead_letters")
    assert [d["reason"] for d in dead] == [reason]
    assert query(db, "SELECT COUNT(*) AS n FROM robot_state")[0]["n"] == 0


# -- an upgrade from own tables 64 characters wide -------------------------------------------
NARROW = {  # the robot_sn columns the version before this one created
    "robot_state": "robot_sn", "robot_events": "robot_sn", "robot_history": "robot_sn",
    "robot_tasks": "robot_sn", "alert_watch": "robot_sn", "target_robots": "robot_key",
    # the default targets, made (so owned) by the product
    "mnt_robots_management": "robot_sn", "mnt_robot_events": "robot_sn",
}


def width(url: str, table: str, column: str) -> int:
    name = url.rsplit("/", 1)[1]
    return int(query(url, "SELECT CHARACTER_MAXIMUM_LENGTH AS n FROM information_schema.COLUMNS"
                          " WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND COLUMN_NAME = ?",
                     (name, table, column))[0]["n"])


@pytest.mark.integration
async def test_migrate_widens_a_64_wide_own_table_and_keeps_its_rows() -> None:
    with scratch_mysql_database() as url:
        async with open_store(url) as store:
            await store.migrate()
        for table, column in NARROW.items():  # as the earlier version declared them
            query(url, f"ALTER TABLE {table} MODIFY COLUMN {column} VARCHAR(64)"
                       " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL")
            assert width(url, table, column) == 64
        now = time.time()
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
        query(url, "INSERT INTO robot_state (org_id, robot_sn, gateway_id, status, last_ts,"
                   f" last_updated) VALUES ('acme', 'R1', 'gw-1', 'online', {now}, '{at}')")
        query(url, "INSERT INTO robot_events (org_id, robot_sn, event_id, event_type, ts,"
                   f" task_time, upload_time) VALUES ('acme', 'R1', 'e1', 'LostLocalization',"
                   f" {now}, '{at}', '{at}')")
        query(url, "INSERT INTO robot_history (org_id, robot_sn, ts, recorded_at, status)"
                   f" VALUES ('acme', 'R1', {now}, '{at}', 'online')")
        async with open_store(url) as store:
            lines = await store.migrate()
        for table, column in NARROW.items():
            assert width(url, table, column) == MAX_SN_BYTES, table
            assert f"table {table}: widened {column} from 64 to {MAX_SN_BYTES} characters, " \
                   "rows kept" in lines, lines
        async with callback_server(url) as client:
            await found_under_itself(client, "R1")
            for body in pudu_bodies(LONG_SN):
                r = await client.post("/api/pudu/webhook", json=body,
                                      headers={"CallbackCode": CODE})
                assert r.status_code == 200, r.text
            await found_under_itself_among(client, LONG_SN, ["R1", LONG_SN])


async def found_under_itself_among(client: httpx.AsyncClient, sn: str, all_sns: list[str]) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    robot = (await client.get(f"/robots/{sn}", headers=auth)).json()
    assert robot["robot_sn"] == sn
    listed = (await client.get("/robots", headers=auth)).json()
    items = listed["items"] if isinstance(listed, dict) else listed
    assert sorted(r["robot_sn"] for r in items) == sorted(all_sns)


def test_every_own_key_fits_an_innodb_index_in_utf8mb4() -> None:
    """MySQL refuses a primary key over 3072 bytes; utf8mb4 takes 4 bytes a character. The
    widest, robot_events (org_id, robot_sn, event_id), must still be created."""
    from callback_server.store.migration import OWN
    from callback_server.store.schema import OWN_EVENTS, SN_CHARS

    assert SN_CHARS == MAX_SN_BYTES
    for table, spec in OWN.items():
        size = sum(spec.column(c).size for c in spec.key if spec.column(c).kind != "serial")
        assert size * 4 <= 3072, (table, size)
        if "robot_sn" in spec.names:
            assert spec.column("robot_sn").size == MAX_SN_BYTES, table
    assert sum(OWN_EVENTS.column(c).size for c in OWN_EVENTS.key) * 4 == 1536
