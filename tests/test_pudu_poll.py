"""Scheduled reconciliation end to end: stub Pudu API -> edge agent -> Mosquitto ->
callback server -> database, with real processes (the stub on a uvicorn thread); and
the poller's own rules in one process on the memory broker."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.errors import ConfigError, OutboxFullError
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.memory import MemoryTransport
from edge_agent import config_checks
from edge_agent import settings as config
from edge_agent.service import EdgeAgent
from tests.support.dbutil import query
from tests.support.pudu_stub import KEY, SECRET, StubServer, serve_stub
from tests.support.services import ServiceProcess, callback_server, edge_agent
from tests.support.waiting import eventually, eventually_async

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
HEADERS = {"CallbackCode": "test-code"}
SHOP, OTHER = "12345", "777"


@pytest.fixture
def stub() -> Iterator[StubServer]:
    yield from serve_stub()


def pudu_env(stub: StubServer, shops: str = SHOP, **extra: str) -> dict[str, str]:
    return {"PUDU_API_URL": stub.url, "PUDU_API_KEY": KEY, "PUDU_API_SECRET": SECRET,
            "PUDU_SHOP_IDS": shops, "PUDU_POLL_INTERVAL": "3600",
            "PUDU_API_TIMEOUT_SECONDS": "1", "PUDU_API_RETRIES": "2", **extra}


def admin_url(agent: ServiceProcess) -> str:
    return f"http://127.0.0.1:{agent.env['EDGE_ADMIN_PORT']}"


def poll(agent: ServiceProcess) -> dict[str, Any]:
    r = httpx.post(admin_url(agent) + "/pudu/poll", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def robots(db: str) -> dict[str, dict[str, Any]]:
    return {r["robot_sn"]: r for r in query(db, "SELECT * FROM mnt_robots_management")}


def test_poll_publishes_fleet_state_and_the_cloud_stores_it(
        tmp_path: Path, stub: StubServer, db_url: str) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    now_ms = int(time.time() * 1000)
    for i in range(3):
        stub.stub.add_robot(f"P{i}", SHOP, battery=50 + i, timestamp=str(now_ms - 60_000),
                            mapName=f"map-{i}")
    stub.stub.add_robot("ELSEWHERE", "999")  # another gateway's shop: not polled here
    with callback_server(tmp_path, BROKER, db_url, TOPIC_PREFIX=p) as server, \
            edge_agent(tmp_path, BROKER, org="acme", gateway="gwp", TOPIC_PREFIX=p,
                       **pudu_env(stub)) as agent:
        # the run at start
        eventually(lambda: (agent.health()["poll"] or {}).get("last_run"), what="first run")
        rows = eventually(lambda: robots(db_url), what="3 robots stored", accept=lambda r: len(
            r) == 3 and all(v["map_name"] for v in r.values()))
        assert {sn: (r["battery_level"], r["map_name"], r["status"], r["gateway_id"])
                for sn, r in rows.items()} == {
            f"P{i}": (50 + i, f"map-{i}", "idle", "gwp") for i in range(3)}
        assert rows["P0"]["x"] == 1.5 and rows["P0"]["last_ts"] == pytest.approx(
            (now_ms - 60_000) / 1000)
        first = agent.health()["poll"]["last_run"]
        assert first["status"] == "ok" and first["robots_seen"] == 3
        assert first["envelopes_published"] == 9  # status, power, pose per robot

        # unchanged robots are not republished; a changed one is
        again = poll(agent)
        assert again["envelopes_published"] == 0 and again["robots_seen"] == 3
        stub.stub.robots["P1"].update(battery=20, timestamp=str(now_ms))
        changed = poll(agent)
        assert changed["envelopes_published"] == 1  # poll.power of P1 only
        eventually(lambda: robots(db_url)["P1"]["battery_level"] == 20, what="P1 at 20 %")

        runs = eventually(lambda: httpx.get(
            server.url + "/ingestion-runs", params={"limit": 2}, headers=server.auth).json(),
            what="3 runs stored", accept=lambda r: len(r["items"]) == 2 and r["next_cursor"])
        rest = httpx.get(server.url + "/ingestion-runs", headers=server.auth,
                         params={"limit": 2, "cursor": runs["next_cursor"]}).json()
        ids = [r["run_id"] for r in runs["items"] + rest["items"]]
        assert ids == [changed["run_id"], again["run_id"], first["run_id"]]
        assert rest["next_cursor"] is None
        assert runs["items"][0]["gateway_id"] == "gwp" and runs["items"][0]["shops"] == [SHOP]
        logged = query(db_url, "SELECT type FROM mqtt_message_log WHERE channel = 'power'")
        assert {r["type"] for r in logged} == {"poll.power"}
        metrics = httpx.get(admin_url(agent) + "/metrics").text
        assert 'edge_poll_runs_total{status="ok"} 3.0' in metrics


def test_webhook_and_poll_interleaved_end_with_the_newest_robot_time(
        tmp_path: Path, stub: StubServer) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    t0 = int(time.time()) - 600
    stub.stub.add_robot("O1", SHOP, battery=40, timestamp=str(t0 * 1000))
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p), \
            edge_agent(tmp_path, BROKER, org="acme", gateway="gwo", TOPIC_PREFIX=p,
                       **pudu_env(stub, PUDU_POLL_INTERVAL="0")) as agent, \
            httpx.Client(base_url=agent.url, headers=HEADERS) as c:
        # a webhook newer than what the poll will read
        r = c.post("/api/pudu/webhook", json={"callback_type": "notifyRobotPower", "data": {
            "sn": "O1", "power": 70, "charge_stage": "CHARGING",
            "notify_timestamp": (t0 + 60) * 1000}})
        assert r.status_code == 200
        eventually(lambda: robots(db).get("O1", {}).get("battery_level"), what="webhook stored")
        poll(agent)  # older robot time: must not win
        eventually(lambda: len(poll_power(db)) == 1, what="older poll.power stored")
        assert robots(db)["O1"]["battery_level"] == 70
        stub.stub.robots["O1"].update(battery=30, timestamp=str((t0 + 120) * 1000))
        poll(agent)  # newer: wins
        eventually(lambda: robots(db)["O1"]["battery_level"] == 30, what="poll state stored")
        r = c.post("/api/pudu/webhook", json={"callback_type": "notifyRobotPower", "data": {
            "sn": "O1", "power": 90, "notify_timestamp": (t0 + 90) * 1000}})
        assert r.status_code == 200  # late webhook, older than the poll: ignored
        late = r.json()["data"]["message_id"]
        eventually(lambda: query(
            db, "SELECT id FROM mqtt_message_log WHERE id = ?", (late,)),
            what="late webhook stored")
        assert robots(db)["O1"]["battery_level"] == 30


def poll_power(db: str) -> list[dict[str, Any]]:
    return query(db, "SELECT id FROM mqtt_message_log WHERE type = 'poll.power'")


def test_backfilled_event_and_the_same_webhook_are_stored_once(
        tmp_path: Path, stub: StubServer) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    stub.stub.add_robot("E1", SHOP)
    at = time.time() - 300
    stub.stub.add_error("E1", SHOP, at, "vir_1735690000", level="Error")
    stub.stub.add_error("E1", SHOP, at - 30, None)  # no error_id
    stub.stub.add_error("E1", SHOP, time.time() - 30 * 3600, "too-old")  # beyond 24 h
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p) as server, \
            edge_agent(tmp_path, BROKER, org="acme", gateway="gwe", TOPIC_PREFIX=p,
                       **pudu_env(stub, PUDU_POLL_INTERVAL="0")) as agent:
        r = httpx.post(agent.url + "/api/pudu/webhook", headers=HEADERS, json={
            "callback_type": "robotErrorWarning", "data": {
                "sn": "E1", "error_level": "Error", "error_type": "LostLocalization",
                "error_detail": "OdomSlip", "error_id": "vir_1735690000",
                "timestamp": int(at) + 600}})
        assert r.status_code == 200
        webhook_id = r.json()["data"]["message_id"]
        first = poll(agent)
        second = poll(agent)  # the overlapping window reads both rows again
        assert first["events_backfilled"] == 2 and second["events_backfilled"] == 0
        assert first["window_end"] - first["window_start"] == pytest.approx(24 * 3600, abs=5)
        assert second["window_start"] == pytest.approx(first["window_end"] - 900, abs=2)
        calls = stub.stub.calls_to("/log/error/query_list")
        assert all(c.query["timezone_offset"] == "0" and c.query["limit"] == "20"
                   for c in calls)
        # The second run's record is published after its events: once it is stored,
        # the backfilled copy of the webhook's event has been through the cloud too.
        eventually(lambda: second["run_id"] in [r["run_id"] for r in httpx.get(
            server.url + "/ingestion-runs", headers=server.auth).json()["items"]],
            what="second run stored")
        events = query(db, "SELECT * FROM mnt_robot_events WHERE robot_sn = 'E1'")
        assert len(events) == 2
        assert {e["event_id"] for e in events} >= {"vir_1735690000"}
        logged = query(db, "SELECT id FROM mqtt_message_log WHERE channel = 'event'")
        # the webhook's, and the event without an error_id: the backfilled copy of the
        # webhook's event carried its id and was stored once
        assert len(logged) == 2 and webhook_id in {r["id"] for r in logged}
        assert server.health()["dead_lettered"] == 0


def test_failures_are_retried_within_bounds_recorded_and_one_shop_does_not_stop_others(
        tmp_path: Path, stub: StubServer) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    stub.stub.add_robot("F1", SHOP)
    stub.stub.add_robot("F2", OTHER)
    stub.stub.stall_seconds = 3
    with edge_agent(tmp_path, BROKER, org="acme", gateway="gwf", TOPIC_PREFIX=p,
                    **pudu_env(stub, shops=f"{OTHER},{SHOP}", PUDU_POLL_INTERVAL="0")) as agent:
        stub.stub.fail("/v1/api/robot", "429")
        stub.stub.fail("/v2/status/get_by_sn?sn=F1", "500")
        stub.stub.fail("/v1/status/get_by_sn?sn=F1", "stall")
        stub.stub.fail(f"shop_id={OTHER}", "business", times=10)  # that shop refuses
        started = time.monotonic()
        record = poll(agent)
        took = time.monotonic() - started
    assert record["status"] == "partial" and record["shops_failed"] == [OTHER]
    assert "CLOUD_OPEN_ROBOT_OFFLINE" in record["error"]
    assert record["robots_seen"] == 1 and record["envelopes_published"] == 3
    assert record["api_retries"] == 3  # the 429, the 500, the stalled call
    assert took < 15


def test_a_webhook_is_answered_while_a_poll_call_is_stalled(
        tmp_path: Path, stub: StubServer) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    stub.stub.add_robot("S1", SHOP)
    stub.stub.stall_seconds = 5
    with edge_agent(tmp_path, BROKER, org="acme", gateway="gws", TOPIC_PREFIX=p,
                    **pudu_env(stub, PUDU_POLL_INTERVAL="0",
                               PUDU_API_TIMEOUT_SECONDS="4")) as agent:
        stub.stub.fail("/v2/status", "stall")
        result: list[dict[str, Any]] = []
        runner = threading.Thread(target=lambda: result.append(poll(agent)))
        runner.start()
        eventually(lambda: stub.stub.calls_to("/v2/status/get_by_sn"), what="stalled call")
        with httpx.Client(base_url=agent.url, headers=HEADERS) as c:
            times = []
            for i in range(5):
                t = time.monotonic()
                r = c.post("/api/pudu/webhook", json={"callback_type": "robotStatus",
                                                      "data": {"sn": "S1", "run_status": "ONLINE",
                                                               "timestamp": 1700000000 + i}})
                times.append(time.monotonic() - t)
                assert r.status_code == 200
            health = c.get("/api/pudu/webhook/health").json()
        assert health["poll"]["running"] is True
        runner.join(30)
    assert max(times) < 1.0, times
    assert result and result[0]["api_retries"] == 1 and result[0]["status"] == "ok"


def test_poll_once_without_an_agent_runs_one_itself(tmp_path: Path, stub: StubServer) -> None:
    import os
    import subprocess
    import sys

    stub.stub.add_robot("C1", SHOP)
    env = {**os.environ, **pudu_env(stub), "PUDU_CALLBACK_CODE": "x", "MQTT_URL": BROKER,
           "ORG_ID": "acme", "GATEWAY_ID": "gwc", "TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}",
           "OUTBOX_PATH": str(tmp_path / "outbox.db"), "EDGE_ADMIN_PORT": "1"}
    out = subprocess.run([sys.executable, "-m", "edge_agent", "poll", "--once"], env=env,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    import json
    record = json.loads(out.stdout)
    assert record["status"] == "ok" and record["robots_seen"] == 1


# -- the poller's rules, in one process on the memory broker ------------------------------

Seen = list[tuple[str, dict[str, Any]]]


@asynccontextmanager
async def in_process(tmp_path: Path, stub: StubServer, shops: str = SHOP,
                     outbox: str = "outbox.db", **extra: str) -> AsyncIterator[
                         tuple[EdgeAgent, httpx.AsyncClient, Seen]]:
    """An agent polling ``stub`` (runs are asked for; ``extra``: more settings), its
    webhook app, and every envelope it publishes as (topic, envelope), in order."""
    broker = f"edge-{uuid.uuid4().hex[:8]}"
    settings = config.load(None, {
        "PUDU_CALLBACK_CODE": HEADERS["CallbackCode"], "MQTT_URL": f"mqtt://{broker}",
        "MQTT_BACKEND": "memory", "ORG_ID": "acme", "GATEWAY_ID": "gwi",
        "OUTBOX_PATH": str(tmp_path / outbox),
        **pudu_env(stub, shops, **{"PUDU_POLL_INTERVAL": "0", **extra})})
    seen: Seen = []

    def keep(message: InboundMessage) -> None:
        if message.payload.startswith(b"{"):  # envelopes (presence is a plain word)
            seen.append((message.topic, json.loads(message.payload)))

    watcher = MemoryTransport(MqttSettings.from_url(f"mqtt://{broker}", client_id="watch",
                                                    clean_start=True))
    watcher.message_handler = keep
    async with watcher:
        await watcher.subscribe("org/acme/#", qos=1)
        async with EdgeAgent(settings) as agent, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=agent.app), base_url="http://gw",
                headers=HEADERS) as client:
            yield agent, client, seen


def on(seen: Seen, channel: str) -> list[dict[str, Any]]:
    return [env for topic, env in seen if topic.endswith(f"/{channel}")]


async def test_a_state_a_webhook_changed_is_corrected_by_the_next_poll(
        tmp_path: Path, stub: StubServer) -> None:
    t = int(time.time()) - 600
    stub.stub.add_robot("R1", SHOP, runState="IDLE", timestamp=str(t * 1000))
    async with in_process(tmp_path, stub) as (agent, client, seen):
        first = await agent.poller.run_once()
        r = await client.post("/api/pudu/webhook", json={
            "callback_type": "notifyRobotStatus",
            "data": {"sn": "R1", "run_state": "BUSY", "notify_timestamp": (t + 60) * 1000}})
        assert r.status_code == 200
        # back to IDLE; that webhook is lost (Pudu gave up): only the API says so
        stub.stub.robots["R1"].update(runState="IDLE", timestamp=str((t + 120) * 1000))
        second = await agent.poller.run_once()
        statuses = await eventually_async(lambda: on(seen, "status"), what="3 status envelopes",
                                          accept=lambda s: len(s) == 3, within=10)
    assert first["envelopes_published"] == 3 and second["envelopes_published"] == 1
    newest = max(statuses, key=lambda e: e["ts"])
    assert (newest["type"], newest["data"]["status"]) == ("poll.status", "idle")
    assert [e.get("source") for e in statuses] == ["poll", None, "poll"]


async def test_the_same_robot_state_polled_twice_has_the_same_id_on_the_wire(
        tmp_path: Path, stub: StubServer) -> None:
    stub.stub.add_robot("R1", SHOP, timestamp=str(int(time.time() - 60) * 1000))
    envelopes = []
    for outbox in ("one.db", "two.db"):  # two gateways: nothing remembered between them
        async with in_process(tmp_path, stub, outbox=outbox) as (agent, _, seen):
            await agent.poller.run_once()
            await eventually_async(lambda: sum(
                len(on(seen, c)) for c in ("status", "power", "pose")) == 3,
                what="3 state envelopes", within=10)
            envelopes.append({c: on(seen, c)[0] for c in ("status", "power", "pose")})
    first, second = envelopes
    for channel in ("status", "power", "pose"):
        assert first[channel]["type"] == f"poll.{channel}"
        assert first[channel]["source"] == "poll"
        assert first[channel]["id"] == second[channel]["id"]
    assert first["pose"]["data"]["map_name"] == "floor-1"


async def test_a_full_outbox_fails_the_shop_so_its_events_are_read_again(
        tmp_path: Path, stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    stub.stub.add_robot("R1", SHOP)
    at = time.time() - 3600
    stub.stub.add_error("R1", SHOP, at, "vir_1h")
    async with in_process(tmp_path, stub) as (agent, _, seen):
        real = agent.outbox.put

        async def full(topic: str, payload: bytes, **kw: Any) -> Any:
            if topic.endswith("/event"):  # the outbox at its bound (broker away)
                raise OutboxFullError(10, 10)
            return await real(topic, payload, **kw)

        monkeypatch.setattr(agent.outbox, "put", full)
        first = await agent.poller.run_once()
        monkeypatch.setattr(agent.outbox, "put", real)
        second = await agent.poller.run_once()
        events = await eventually_async(lambda: on(seen, "event"), what="event published",
                                        within=10)
    assert first["status"] == "failed" and first["shops_failed"] == [SHOP]
    assert "outbox full" in first["error"] and first["events_through"] is None
    assert second["events_backfilled"] == 1 and second["window_start"] <= at
    assert events[0]["data"]["event_id"] == "vir_1h"


async def test_a_shop_added_later_is_backfilled_from_its_own_look_back(
        tmp_path: Path, stub: StubServer) -> None:
    stub.stub.add_robot("R1", SHOP)
    stub.stub.add_robot("R2", OTHER)
    at = time.time() - 3 * 3600
    stub.stub.add_error("R2", OTHER, at, "vir_3h")
    async with in_process(tmp_path, stub, shops=SHOP) as (agent, _, _seen):
        before = await agent.poller.run_once()
    async with in_process(tmp_path, stub, shops=f"{SHOP},{OTHER}") as (agent, _, _seen):
        after = await agent.poller.run_once()
    assert before["status"] == after["status"] == "ok"
    assert after["events_backfilled"] == 1  # OTHER's event, before the first run's window
    starts = {c.query["shop_id"]: int(c.query["start_time"])
              for c in stub.stub.calls_to("/log/error/query_list")[-2:]}
    assert starts[SHOP] == pytest.approx(before["window_end"] - 900, abs=2)
    assert starts[OTHER] == pytest.approx(time.time() - 24 * 3600, abs=30)


async def test_a_run_with_no_shops_is_refused_and_a_key_without_shops_is_warned(
        tmp_path: Path, stub: StubServer) -> None:
    async with in_process(tmp_path, stub, shops="", PUDU_POLL_INTERVAL="300") as (
            agent, _, _seen):
        assert not agent.poller.enabled
        with pytest.raises(ConfigError, match="PUDU_SHOP_IDS"):
            await agent.poller.run_once()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=agent.admin_app),
                                     base_url="http://admin") as admin:
            r = await admin.post("/pudu/poll")
        assert await agent.journal.runs() == ([], None)
        warned = config_checks.warnings(agent.settings)
    assert r.status_code == 409 and "PUDU_SHOP_IDS" in r.json()["message"]
    assert not stub.stub.calls
    assert any("PUDU_SHOP_IDS is empty" in w and "polling is off" in w for w in warned)


async def test_runs_never_overlap(tmp_path: Path, stub: StubServer) -> None:
    stub.stub.add_robot("R1", SHOP)
    stub.stub.stall_seconds = 0.5  # within the 1 s timeout: each run waits on the API
    stub.stub.fail("/v2/status", "stall", times=2)
    async with in_process(tmp_path, stub) as (agent, _, _seen):
        records = await asyncio.gather(agent.poller.run_once(), agent.poller.run_once())
    first, second = sorted(records, key=lambda r: r["started_at"])
    assert first["status"] == second["status"] == "ok"
    assert second["started_at"] >= first["ended_at"]
    assert len(stub.stub.calls_to("/v2/status/get_by_sn")) == 2


@pytest.mark.parametrize(("cap", "shifts"), [
    (7, ()),                      # pages capped below the asked limit (50 robots, 20 log rows)
    (None, (-60, 0, 25, -40)),    # count under- and over-reported, page by page
    (7, (-60, 0, 25, -40)),       # both
], ids=["capped", "shifting", "capped-and-shifting"])
async def test_every_robot_and_event_is_read_whatever_the_pages(
        tmp_path: Path, stub: StubServer, cap: int | None, shifts: tuple[int, ...]) -> None:
    at = time.time() - 1800
    sns = {f"P{i:03d}" for i in range(61)}
    for i, sn in enumerate(sorted(sns)):
        stub.stub.add_robot(sn, SHOP)
        stub.stub.add_error(sn, SHOP, at + i, f"vir_{i}")
    stub.stub.page_cap, stub.stub.count_shifts = cap, shifts
    async with in_process(tmp_path, stub) as (agent, _, seen):
        record = await agent.poller.run_once()
        statuses = await eventually_async(
            lambda: on(seen, "status"), what="every robot's status", within=10,
            accept=lambda s: len({e["device"] for e in s}) >= len(sns))
        events = await eventually_async(
            lambda: on(seen, "event"), what="every event", within=10,
            accept=lambda s: len({e["data"]["event_id"] for e in s}) >= len(sns))
    assert record["status"] == "ok" and record["robots_seen"] == len(sns)
    assert {e["device"] for e in statuses} == sns
    assert {e["data"]["event_id"] for e in events} == {f"vir_{i}" for i in range(len(sns))}
    offsets = [int(c.query["offset"]) for c in stub.stub.calls_to("/api/robot")]
    assert offsets == sorted(set(offsets))  # advanced by what came back, never repeated
