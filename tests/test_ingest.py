"""``POST /callback/messages`` against an in-process callback server (memory broker,
SQLite): what a buggy or hostile producer sends is answered 4xx and dead-lettered, or
stored truthfully — never a 5xx, never a robot frozen or invented."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from callback_server import settings as cb_config
from callback_server.keys import add_key
from callback_server.service import CallbackServer
from tests.support.dbutil import query, scratch_mysql_database
from tests.support.hostile import WIDE_ENCODINGS, nested
from tests.test_strictjson import strict_loads

RULE, ADMIN = "rule-token", "admin-token"


@dataclass
class Ingest:
    server: CallbackServer
    client: httpx.AsyncClient
    db: str
    acme_key: str  # an ingest key of org acme only

    async def post(self, body: bytes | Any, **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.client.post("/callback/messages", content=content,
                                      headers={"X-Callback-Token": RULE, **headers})

    def dead(self) -> list[dict[str, Any]]:
        return query(self.db, "SELECT topic, payload, reason FROM mqtt_dead_letters")

    def nothing_kept(self) -> bool:
        """No dead letter and no stored message (their tables are made on first write)."""
        tables = {r["name"] for r in query(self.db, "SELECT name FROM sqlite_master")}
        return not ({"mqtt_dead_letters", "mqtt_message_log"} & tables) or (
            self.dead() == [] and query(self.db, "SELECT id FROM mqtt_message_log") == [])

    async def robot(self, sn: str) -> dict[str, Any] | None:
        r = await self.client.get(f"/robots/{sn}", headers={"Authorization": f"Bearer {ADMIN}"})
        return r.json() if r.status_code == 200 else None


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[Ingest]:
    keys = tmp_path / "keys.yaml"
    acme = add_key(keys, "rule-acme", ["acme"], "ingest")
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    settings = cb_config.load(None, {
        "MQTT_URL": f"mqtt://b{uuid.uuid4().hex[:8]}", "MQTT_BACKEND": "memory",
        "DATABASE_URL": db, "API_KEYS_FILE": str(keys),
        "CALLBACK_TOKEN": RULE, "PROXY_TOKEN": ADMIN})
    async with CallbackServer(settings) as server:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cb") as client:
            yield Ingest(server, client, db, acme)


def envelope(i: int, **fields: Any) -> dict[str, Any]:
    env = {"v": 1, "id": f"e{i}", "type": "notifyRobotStatus", "channel": "status",
           "org": "acme", "device": "R1", "gateway": "site-a", "ts": time.time(),
           "data": {"status": "idle"}, "raw": {"sn": "R1"}}
    env.update(fields)
    return env


# -- every envelope fault: 4xx and one dead letter, before the answer -------------------------
BAD_ENVELOPES = {
    "v is a string": json.dumps(envelope(1, v="x")).encode(),
    "v beyond a double": json.dumps(envelope(2, v="__V__")).encode().replace(b'"__V__"',
                                                                           b"1e400"),
    "nested 900 levels": json.dumps(envelope(3, data="__D__")).encode().replace(
        b'"__D__"', nested(900).encode()),
    "nested 3000 levels at the top": nested(3000).encode(),
    # an escaped quote first: it once misled the depth scan over UTF-16 bytes
    **{f"UTF-16/32 ({enc})": json.dumps(envelope(4, data={"q": '"', "x": "__D__"})).replace(
        '"__D__"', nested(900)).encode(enc) for enc in WIDE_ENCODINGS[:4]},
    "UTF-16, shallow": json.dumps(envelope(5)).encode("utf-16"),
}


@pytest.mark.parametrize("body", BAD_ENVELOPES.values(), ids=list(BAD_ENVELOPES))
async def test_an_envelope_fault_is_dead_lettered_once_and_answered_as_such(
        ingest: Ingest, body: bytes) -> None:
    """An unreadable body is a 400; a readable one whose envelope is bad is settled:
    200 with that element dead-lettered, and the reason in the answer."""
    for _ in range(2):  # the rule's retry of the same body is kept once
        r = await ingest.post(body)
        if r.status_code == 400:
            assert r.json()["status"] == "error"
            kind = "unreadable"
        else:
            assert r.status_code == 200, r.text
            answer = r.json()
            assert (answer["stored"], answer["dead_lettered"]) == (0, 1), answer
            assert answer["results"][0]["reason"].startswith("malformed: "), answer
            kind = "malformed"
    dead = ingest.dead()
    assert len(dead) == 1 and dead[0]["reason"].startswith(kind), dead
    assert await ingest.robot("R1") is None
    assert query(ingest.db, "SELECT COUNT(*) AS n FROM mqtt_message_log")[0]["n"] == 0


# -- time sanity on write -------------------------------------------------------------------
@pytest.mark.parametrize("future", [4_102_444_800, 1.7e12, 1e13, 253402300800],
                         ids=["year 2100", "milliseconds", "past year 9999", "year 10000"])
async def test_a_far_future_ts_is_ordered_by_the_server_clock(ingest: Ingest,
                                                              future: float) -> None:
    first = await ingest.post(envelope(1, ts=future, data={"status": "stuck"}))
    assert first.status_code == 200, first.text
    row = await ingest.robot("R1")
    assert row is not None and row["status"] == "stuck"  # kept, as of the server's clock
    second = await ingest.post(envelope(2, data={"status": "idle"}))
    assert second.status_code == 200, second.text
    row = await ingest.robot("R1")
    assert row is not None and row["status"] == "idle"  # the current state wins
    logged = query(ingest.db, "SELECT payload FROM mqtt_message_log WHERE id = 'e1'")
    kept = strict_loads(logged[0]["payload"])
    assert kept["ts"] == future and "ahead of the server clock" in kept["notes"][0]
    assert (await ingest.server.health())["clock_skewed"] == 1


# -- shop-level callbacks stay out of robot state -------------------------------------------
@pytest.mark.parametrize("raw", [{}, {"sn": ""}, {"sn": None}, {"sn": "  "},
                                 {"shop_id": 7, "map_name": "F1"}],
                         ids=["empty", "blank sn", "null sn", "spaces sn", "no sn"])
async def test_a_shop_level_callback_makes_no_robot(ingest: Ingest, raw: dict[str, Any]) -> None:
    shop = envelope(1, type="mapElementChange", channel="callback/mapElementChange",
                    device="site-a", data={}, raw=raw)
    r = await ingest.post(shop)
    assert r.status_code == 200 and r.json()["stored"] == 1, r.text
    assert await ingest.robot("site-a") is None
    robot = envelope(2, type="mapElementChange", channel="callback/mapElementChange",
                     device="site-a", data={}, raw={"sn": "site-a"})  # named like the gateway
    assert (await ingest.post(robot)).status_code == 200
    assert await ingest.robot("site-a") is not None


# -- a refused request keeps each part under the topic it came with -------------------------
async def test_a_foreign_or_wildcard_org_is_refused_and_kept_under_its_topic(
        ingest: Ingest) -> None:
    key = {"X-Callback-Token": ingest.acme_key}
    foreign = await ingest.post({"topic": "org/other/device/gw/telemetry", "x": 1}, **key)
    assert foreign.status_code == 403, foreign.text
    for topic in ("org/x+y/device/gw/telemetry", "org/x#/device/gw/telemetry",
                  "org/acme/device/R+1/status"):
        r = await ingest.post({"topic": topic, "x": 1}, **key)
        assert r.status_code == 200 and r.json()["dead_lettered"] == 1, r.text
        assert "'+', '#'" in r.json()["results"][0]["reason"], r.text
    dead = ingest.dead()
    assert [d["topic"] for d in dead if d["reason"].startswith("org not covered")] == [
        "org/other/device/gw/telemetry"]
    assert len(dead) == 4


async def test_each_envelope_of_a_list_carries_only_its_own_notes(ingest: Ingest) -> None:
    body = json.dumps([envelope(1, device="R1", data={"x": "__NAN__"}),
                       envelope(2, device="R2", data={"x": 1})]).replace('"__NAN__"', "NaN")
    r = await ingest.post(body.encode())
    assert r.status_code == 200 and r.json()["stored"] == 2, r.text
    rows = query(ingest.db, "SELECT id, payload FROM mqtt_message_log ORDER BY id")
    notes = {row["id"]: strict_loads(row["payload"]).get("notes") for row in rows}
    assert notes == {"e1": ["data.x: nan is not JSON; null"], "e2": None}


# -- the one contract: an AWS batch of 10, each element settled and answered ----------------


def aws_batch() -> list[dict[str, Any]]:
    """What a rule's batched HTTP action (batchAcrossTopics) posts: 10 elements, each with
    its topic; five good ones, then poison, a duplicate, a foreign org, a mismatch between
    envelope and topic, and gateway telemetry."""
    good = [{**envelope(i, device=f"R{i}", raw={"sn": f"R{i}"}),
             "topic": f"org/acme/device/R{i}/status"} for i in range(1, 6)]
    return [*good,
            {**envelope(6, v="x"), "topic": "org/acme/device/R1/status"},
            {**envelope(0, device="R0"), "topic": "org/acme/device/R0/status"},
            {**envelope(8, org="other", device="R8"), "topic": "org/other/device/R8/status"},
            {**envelope(9, device="R9"), "topic": "org/acme/device/R7/status"},
            {"topic": "org/acme/device/site-a/telemetry", "outbox_depth": 0}]


async def test_an_aws_batch_of_ten_answers_each_element_and_stores_the_good_ones(
        ingest: Ingest) -> None:
    key = {"X-Callback-Token": ingest.acme_key}
    earlier = await ingest.post(envelope(0, device="R0"), **key)
    assert earlier.json()["stored"] == 1, earlier.text
    body = aws_batch()
    r = await ingest.post(body, **key)
    assert r.status_code == 200, r.text
    answer = r.json()
    outcomes = [(e["id"], e["outcome"], e.get("reason", "").split(":")[0])
                for e in answer["results"]]
    assert outcomes == [
        *[(f"e{i}", "stored", "") for i in range(1, 6)],
        ("e6", "dead_lettered", "malformed"),
        ("e0", "duplicate", ""),
        ("e8", "dead_lettered", "org not covered by the key"),
        ("e9", "dead_lettered", "inconsistent with its topic"),
        (None, "handled", ""),
    ]
    counts = {k: answer[k] for k in ("stored", "duplicates", "handled", "dead_lettered")}
    assert counts == {"stored": 5, "duplicates": 1, "handled": 1, "dead_lettered": 3}
    for i in range(1, 6):
        assert (await ingest.robot(f"R{i}")) is not None
    for sn in ("R8", "R9", "R7"):
        assert await ingest.robot(sn) is None
    dead = sorted(d["reason"].split(":")[0] for d in ingest.dead())
    assert dead == ["inconsistent with its topic", "malformed", "org not covered by the key"]

    # The rule's retry of the same request: nothing written twice, every element answered.
    again = (await ingest.post(body, **key)).json()
    assert {k: again[k] for k in counts} == {"stored": 0, "duplicates": 6, "handled": 1,
                                              "dead_lettered": 3}, again
    assert len(ingest.dead()) == 3
    logged = query(ingest.db, "SELECT COUNT(*) AS n FROM mqtt_message_log")[0]["n"]
    assert logged == 6

    # Health and /metrics count the same outcomes.
    health = await ingest.server.health()
    assert {k: health[k] for k in counts} == {"stored": 6, "duplicates": 7,
                                              "handled": 2, "dead_lettered": 6}
    metrics = (await ingest.client.get(
        "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})).text
    assert "callback_messages_duplicate_total 7.0" in metrics
    assert "callback_messages_handled_total 2.0" in metrics
    assert 'callback_dead_letters_by_reason{reason="org not covered by the key"} 2.0' in metrics


async def test_a_key_covering_none_of_the_orgs_is_refused_and_each_element_kept(
        ingest: Ingest) -> None:
    body = [{**envelope(i, org="other"), "topic": "org/other/device/R1/status"}
            for i in range(2)]
    r = await ingest.post(body, **{"X-Callback-Token": ingest.acme_key})
    assert r.status_code == 403 and "'other'" in r.json()["message"], r.text
    assert [d["reason"].split(":")[0] for d in ingest.dead()] == [
        "org not covered by the key"] * 2


async def test_a_body_over_the_limit_is_413_and_kept_as_one_dead_letter(
        ingest: Ingest) -> None:
    big = json.dumps([envelope(1, data={"pad": "x" * 1_100_000})]).encode()
    for _ in range(2):
        r = await ingest.post(big)
        assert r.status_code == 413, r.text
    dead = ingest.dead()
    assert len(dead) == 1 and dead[0]["reason"].startswith("unreadable: "), dead


# -- a refusal by the database is answered as one -------------------------------------------
SEED_DDL = (
    """CREATE TABLE mnt_robots_management (
        robot_sn VARCHAR(50) PRIMARY KEY, status VARCHAR(50), battery_level INT,
        water_level INT, sewage_level INT, x DECIMAL(10,6), y DECIMAL(10,6),
        z DECIMAL(10,6), yaw DECIMAL(10,6), charge_state VARCHAR(50), last_updated INT)""",
    """CREATE TABLE mnt_robot_events (
        robot_sn VARCHAR(50), event_id VARCHAR(100), event_level VARCHAR(20),
        event_type VARCHAR(100), event_detail TEXT, task_time INT, upload_time INT,
        PRIMARY KEY (robot_sn, event_id))""",
)


@pytest.mark.integration  # a scratch database on the shared MariaDB
async def test_an_envelope_the_database_refuses_is_answered_and_kept_as_a_dead_letter(
        tmp_path: Path) -> None:
    with scratch_mysql_database() as url:
        name = url.rsplit("/", 1)[1]
        for ddl in SEED_DDL:
            query(url, ddl)
        config = tmp_path / "database_config.yaml"
        config.write_text(yaml.safe_dump({"databases": [name], "tables": {
            "robot_status": [{"database": name, "table_name": "mnt_robots_management",
                              "primary_keys": ["robot_sn"]}],
            "robot_events": [{"database": name, "table_name": "mnt_robot_events",
                              "primary_keys": ["robot_sn", "event_id"]}]}}))
        settings = cb_config.load(None, {
            "MQTT_URL": f"mqtt://b{uuid.uuid4().hex[:8]}", "MQTT_BACKEND": "memory",
            "DATABASE_URL": url, "DATABASE_CONFIG": str(config), "CALLBACK_TOKEN": RULE})
        long_sn = "S" * 60  # the seed's robot_sn is VARCHAR(50): strict mode refuses it
        async with CallbackServer(settings) as server, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=server.app), base_url="http://cb") as client:
            r = await client.post("/callback/messages", headers={"X-Callback-Token": RULE},
                                  json=[envelope(1, device=long_sn, raw={"sn": long_sn}),
                                        envelope(2)])
        assert r.status_code == 200, r.text
        answer = r.json()
        assert (answer["stored"], answer["dead_lettered"]) == (1, 1), answer["results"]
        assert answer["results"][0]["reason"].startswith("refused by the database: "), answer
        assert "mnt_robots_management" in answer["results"][0]["reason"]
        dead = query(url, "SELECT payload, reason FROM mqtt_dead_letters")
        assert len(dead) == 1 and long_sn in dead[0]["payload"]
        assert dead[0]["reason"] == answer["results"][0]["reason"]
        assert query(url, "SELECT robot_sn FROM mnt_robots_management") == [{"robot_sn": "R1"}]


async def test_an_id_with_a_lone_surrogate_is_answered_in_json(ingest: Ingest) -> None:
    """``"\\ud800"`` is valid JSON but not UTF-8: the answer escapes it instead of
    failing, and still names the element by its id."""
    body = json.dumps(envelope(1, id="e\ud800")).encode()  # ensure_ascii: "\ud800" escaped
    r = await ingest.post(body)
    assert r.status_code == 200, r.text
    assert b"\\ud800" in r.content
    answer = r.json()
    assert [x["id"] for x in answer["results"]] == ["e\ud800"]
    assert answer["stored"] + answer["dead_lettered"] == 1


# -- gateway traffic is handled, whether its topic is given or only its envelope's channel ---
async def test_a_presence_envelope_without_a_topic_is_handled_as_with_one(
        ingest: Ingest) -> None:
    presence = envelope(1, channel="presence", device="site-a", data={"state": "online"})
    with_topic = {**envelope(2, channel="presence", device="site-b"),
                  "topic": "org/acme/device/site-b/presence"}
    r = await ingest.post([presence, with_topic, envelope(3)])
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [x["outcome"] for x in answer["results"]] == ["handled", "handled", "stored"], answer
    assert (answer["stored"], answer["handled"]) == (1, 2)
    logged = query(ingest.db, "SELECT id FROM mqtt_message_log")
    assert logged == [{"id": "e3"}]  # gateway traffic is not a stored message
    gateways = (await ingest.client.get(
        "/gateways", headers={"Authorization": f"Bearer {ADMIN}"})).json()["items"]
    assert sorted(g["gateway_id"] for g in gateways) == ["site-a", "site-b"]


# -- AWS IoT's HTTP destination confirmation: no key, answered, never acted on -------------
ARN = "arn:aws:iot:eu-west-1:123456789012:ruledestination/http/7a280e37-b9c6-47a2-a751"
TOKEN = "AYADeMXLrPrNY2wqJAKsFNn-abc_DEF.123NBJndA"


def confirmation(**fields: Any) -> dict[str, Any]:
    """The request AWS IoT POSTs to a destination's confirmation URL (its documented
    shape: the headers below, this body)."""
    body = {"arn": ARN, "confirmationToken": TOKEN,
            "enableUrl": f"https://iot.eu-west-1.amazonaws.com/confirmdestination/{TOKEN}",
            "messageType": "DestinationConfirmation"}
    body.update(fields)
    return body


CONFIRMATION_HEADERS = {"x-amz-rules-engine-message-type": "DestinationConfirmation",
                        "x-amz-rules-engine-destination-arn": f'"{ARN}"'}


@pytest.fixture
def no_outbound(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every connection or name lookup the service tries, refused and recorded."""
    import socket

    tried: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        tried.append(args[1:] or args)
        raise OSError("outbound traffic refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return tried


@pytest.mark.parametrize("path", ["/callback/messages", "/callback/messages/"])
async def test_aws_destination_confirmation_is_answered_logged_once_and_never_called(
        ingest: Ingest, caplog: pytest.LogCaptureFixture, no_outbound: list[Any],
        path: str) -> None:
    caplog.set_level("WARNING", logger="callback_server.ingest")
    for _ in range(2):  # AWS may send it again: answered each time, logged once
        r = await ingest.client.post(f"{path}?confirmationToken={TOKEN}",
                                     json=confirmation(), headers=CONFIRMATION_HEADERS)
        assert r.status_code == 200, r.text
    warnings = [rec for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    said = warnings[0].getMessage()
    assert f"aws iot confirm-topic-rule-destination --confirmation-token {TOKEN}" in said
    assert ARN in said
    assert no_outbound == []  # the enableUrl is the operator's to open, never ours
    assert ingest.nothing_kept()  # it is not a message
    from callback_server.ingest import confirmations_of

    [pending] = confirmations_of(ingest.server.app).pending()
    assert (pending["arn"], pending["confirmation_token"]) == (ARN, TOKEN)


async def test_a_flood_of_confirmations_is_no_flood_of_log_lines(
        ingest: Ingest, caplog: pytest.LogCaptureFixture) -> None:
    """Anyone may send the confirmation's shape without a key: 50 tokens within a minute
    log one line; the newest four wait in health; the rest are counted."""
    caplog.set_level("WARNING", logger="callback_server.ingest")
    for i in range(50):
        token = f"tok{i:04d}"
        r = await ingest.client.post("/callback/messages", headers={
            "x-amz-rules-engine-message-type": "DestinationConfirmation"},
            json=confirmation(arn=f"{ARN[:-4]}{i:04d}", confirmationToken=token,
                              enableUrl="https://iot.eu-west-1.amazonaws.com/"
                                        f"confirmdestination/{token}"))
        assert r.status_code == 200, r.text
    assert len([rec for rec in caplog.records if rec.levelname == "WARNING"]) == 1
    from callback_server.ingest import confirmations_of

    held = confirmations_of(ingest.server.app)
    assert len(held.pending()) == 4 and held.unlogged == 49


FORGED = {
    "enableUrl on another host": confirmation(
        enableUrl=f"https://evil.example/confirmdestination/{TOKEN}"),
    "enableUrl of another token": confirmation(
        enableUrl="https://iot.eu-west-1.amazonaws.com/confirmdestination/other"),
    "enableUrl in another region": confirmation(
        enableUrl=f"https://iot.us-east-1.amazonaws.com/confirmdestination/{TOKEN}"),
    "not a destination ARN": confirmation(arn="arn:aws:iam::123456789012:role/x"),
    "no messageType": {k: v for k, v in confirmation().items() if k != "messageType"},
    "an envelope": envelope(1),
}


@pytest.mark.parametrize("body", FORGED.values(), ids=list(FORGED))
async def test_anything_else_without_a_key_is_still_401(ingest: Ingest,
                                                       body: dict[str, Any]) -> None:
    for headers in (CONFIRMATION_HEADERS, {}):
        r = await ingest.client.post("/callback/messages", json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
    r = await ingest.client.post("/callback/messages/", json=body)
    assert r.status_code == 401, r.text
    from callback_server.ingest import confirmations_of

    assert confirmations_of(ingest.server.app).pending() == []
    assert ingest.nothing_kept()


async def test_a_confirmation_header_on_a_keyed_batch_changes_nothing(ingest: Ingest) -> None:
    """A rule's own request with the header (read early) is stored as usual."""
    r = await ingest.post([envelope(1)], **CONFIRMATION_HEADERS)
    assert r.status_code == 200 and r.json()["stored"] == 1, r.text


async def test_the_pending_confirmation_is_in_the_authorised_health_body_only(
        ingest: Ingest) -> None:
    r = await ingest.client.post("/callback/messages", json=confirmation(),
                                 headers=CONFIRMATION_HEADERS)
    assert r.status_code == 200, r.text
    keyed = (await ingest.client.get(
        "/callback/health", headers={"Authorization": f"Bearer {ADMIN}"})).json()
    [pending] = keyed["iot_destination_confirmations"]
    assert pending["confirmation_token"] == TOKEN
    public = (await ingest.client.get("/callback/health")).text
    assert TOKEN not in public
