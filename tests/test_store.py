"""The store against real MariaDB and SQLite: idempotent, order-independent writes.

Every database test runs on both backends: SQLite in tmp_path and a scratch database
on the shared MariaDB (created per test, dropped afterwards).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import aiomysql
import pymysql
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.envelope import Envelope
from bridge.errors import ConfigError, StoreError
from bridge.strictjson import loads as strict_loads
from bridge.topic import MAX_SN_BYTES
from callback_server.retention import Retention
from callback_server.store import BatchResult, SqlStore, Table, Targets, load_targets, open_store
from callback_server.store.base import Query, Statement
from callback_server.store.mysql import _mogrify
from callback_server.store.rows import build_rows, key, when
from callback_server.store.schema import COMMAND_TABLE, DEAD_TABLE, LOG_TABLE, ROBOT_ROW
from tests.support.dbutil import query, scans

EXAMPLES = Path(__file__).resolve().parents[1] / "config.example"
TYPES = {"status": "notifyRobotStatus", "power": "notifyRobotPower", "pose": "notifyRobotPose",
         "event": "robotErrorWarning", "move": "notifyRobotMoveState", "task": "TASK_STATUS"}


#: Where the small robot times of these tests start (2023-11-14 22:13:20 UTC).
T0 = 1_700_000_000


def env(sn: str, channel: str, ts: float, ctype: str = "", *, msg_id: str = "",
        gateway: str = "gw1", **data: Any) -> Envelope:
    ctype = ctype or TYPES.get(channel, channel)
    if 0 < ts < 1e9:  # small test times are seconds after T0 (1970 is no robot time since
        ts += T0      # issue 24: before the product existed, so not ordered by)
    return Envelope(id=msg_id or uuid.uuid4().hex, type=ctype, org="acme", device=sn,
                    gateway=gateway, ts=ts, received_at=ts + 1, data=data, raw=dict(data),
                    channel=channel)


def item(e: Envelope) -> tuple[str, Envelope]:
    return (f"org/{e.org}/device/{e.device}/{e.channel}", e)


@contextmanager
def extra_mysql_database() -> Iterator[str]:
    """A database name for a second target; dropped afterwards."""
    name = f"test_store_{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        with pymysql.connect(host="127.0.0.1", user="root", password="") as conn:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlStore]:
    async with open_store(db_url) as s:
        await s.migrate()
        yield s


async def robot(store: SqlStore, sn: str) -> dict[str, Any]:
    row = await store.get_robot(sn)
    assert row is not None, f"robot {sn} missing"
    return row


# -- schema ------------------------------------------------------------------------------

def table_names(url: str) -> set[str]:
    if url.startswith("sqlite"):
        return {r["name"] for r in query(url, "SELECT name FROM sqlite_master WHERE type='table'")}
    return {next(iter(r.values())) for r in query(url, "SHOW TABLES")}


def column_names(url: str, table: str) -> list[str]:
    if url.startswith("sqlite"):
        return [r["name"] for r in query(url, f"PRAGMA table_info({table})")]
    return [r["Field"] for r in query(url, f"SHOW COLUMNS FROM {table}")]


async def test_migrate_creates_the_tables_and_is_idempotent(db_url: str) -> None:
    async with open_store(db_url) as s:
        await s.migrate()
        await s.write_batch([item(env("A", "status", 10, status="idle"))])
    first = {t: column_names(db_url, t) for t in table_names(db_url)}
    assert {"mnt_robots_management", "mnt_robot_events", "mqtt_message_log",
            "mqtt_dead_letters", "device_commands"} <= set(first)
    assert {"robot_sn", "status", "battery_level", "water_level", "sewage_level", "x", "y", "z",
            "yaw", "charge_state", "last_updated", "status_ts", "pose_ts", "battery_ts",
            "last_ts"} <= set(first["mnt_robots_management"])
    async with open_store(db_url) as s:  # a restart, and a second migrate in one run
        await s.migrate()
        await s.migrate()
        assert (await robot(s, "A"))["status"] == "idle"
    assert {t: column_names(db_url, t) for t in table_names(db_url)} == first


async def test_every_table_the_product_makes_is_recorded_as_its_own(db_url: str) -> None:
    """``store_tables`` (and ``migrate``'s ``owns:`` line) names every table the product
    created, the webhooks' included: a table missing there would be taken for a DBA's."""
    from callback_server.webhooks.store import WebhookStore

    async with open_store(db_url) as s:
        said = await s.migrate()
        await WebhookStore(s).all()  # what the webhook store makes on first use
    owned = {r["table_name"]: r["how"] for r in query(db_url, "SELECT table_name, how"
                                                              " FROM store_tables")}
    made = table_names(db_url) - {"sqlite_sequence"}
    assert made - set(owned) == set()
    assert {"webhooks", "webhook_deliveries", "webhook_presence"} <= set(owned)
    assert set(owned.values()) == {"created"}
    owns = next(line for line in said if line.startswith("owns: "))
    assert "webhooks, webhook_deliveries, webhook_presence" in owns


async def test_concurrent_migrations_of_replicas_do_not_fail(db_url: str) -> None:
    stores = [open_store(db_url) for _ in range(3)]
    await asyncio.gather(*(s.migrate() for s in stores))
    await asyncio.gather(*(s.close() for s in stores))


async def test_what_waits_for_the_first_migration_does_not_run_it_again(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At launch into a backlog three batches, a health ping and the alerts all wait for
    the tables: one migration serves them all (run once each, in turn, they held the
    first health answer for seconds, and it said the database was unavailable)."""
    from callback_server.store.migration import Migration
    runs = 0
    run = Migration.run

    async def counted(self: Any) -> Any:
        nonlocal runs
        runs += 1
        return await run(self)

    monkeypatch.setattr(Migration, "run", counted)
    async with open_store(db_url) as s:
        batches = [s.write_batch([item(env(f"R{i}", "status", 10, status="idle"))])
                   for i in range(3)]
        written, (pinged, _) = await asyncio.gather(asyncio.gather(*batches),
                                                     asyncio.gather(s.ping(), s.ready()))
        assert [r.messages for r in written] == [1, 1, 1] and pinged is True
        assert runs == 1
        await s.migrate()  # asked for (callback-server migrate): run again
        assert runs == 2


# -- latest state ------------------------------------------------------------------------

async def test_latest_state_is_upserted_and_merged(store: SqlStore) -> None:
    await store.write_batch([item(env("A", "status", 10, status="idle", battery_level=50,
                                      is_charging=False, move_state="idle"))])
    await store.write_batch([item(env("A", "power", 11.25, battery_level=49,
                                      charge_state="charging"))])
    r = await robot(store, "A")
    assert (r["status"], r["battery_level"], r["charge_state"], r["is_charging"],
            r["move_state"]) == ("idle", 49, "charging", False, "idle")
    assert (r["org_id"], r["gateway_id"]) == ("acme", "gw1")
    assert r["last_ts"] == T0 + 11.25
    assert r["last_updated"] == "2023-11-14T22:13:31.250Z"
    assert [x["robot_sn"] for x in await store.get_robots()] == ["A"]
    assert await store.get_robot("nobody") is None


async def test_older_ts_never_overwrites_newer_across_batches(store: SqlStore) -> None:
    await store.write_batch([item(env("A", "status", 20, status="busy", battery_level=70))])
    await store.write_batch([item(env("A", "status", 10, status="offline", battery_level=10))])
    await store.write_batch([item(env("A", "power", 15, battery_level=15))])
    r = await robot(store, "A")
    assert (r["status"], r["battery_level"], r["last_ts"]) == ("busy", 70, T0 + 20)
    await store.write_batch([item(env("A", "status", 20, status="idle"))])  # equal ts: taken
    assert (await robot(store, "A"))["status"] == "idle"


@pytest.mark.parametrize("newest_first", [True, False])
async def test_older_ts_never_overwrites_newer_within_a_batch(
    store: SqlStore, newest_first: bool
) -> None:
    batch = [item(env("B", "power", 30, battery_level=30, charge_state="full")),
             item(env("B", "power", 20, battery_level=20, charge_state="charging")),
             item(env("B", "pose", 25, x=1.0, y=2.0)),
             item(env("B", "pose", 5, x=9.0, y=9.0))]
    result = await store.write_batch(batch if newest_first else batch[::-1])
    assert result.robots == 1
    r = await robot(store, "B")
    assert (r["battery_level"], r["charge_state"], r["x"], r["y"]) == (30, "full", 1.0, 2.0)
    assert r["last_ts"] == T0 + 30


async def test_pose_does_not_wipe_status_and_status_does_not_wipe_pose(store: SqlStore) -> None:
    await store.write_batch([item(env("C", "status", 10, status="idle", battery_level=80))])
    await store.write_batch([item(env("C", "pose", 11, x=1.5, y=2.5, z=0.5, yaw=90.0))])
    r = await robot(store, "C")
    assert (r["status"], r["battery_level"], r["x"], r["y"], r["z"], r["yaw"]) == (
        "idle", 80, 1.5, 2.5, 0.5, 90.0)
    await store.write_batch([item(env("C", "status", 12, status="busy"))])
    await store.write_batch([item(env("C", "move", 13, move_state="moving"))])
    r = await robot(store, "C")
    assert (r["status"], r["battery_level"], r["x"], r["yaw"], r["move_state"]) == (
        "busy", 80, 1.5, 90.0, "moving")


async def test_cleaning_robot_state_comes_from_status_and_error_notice(store: SqlStore) -> None:
    # CC1/MT1 never send notifyRobotPower/notifyRobotPose (docs/pudu.md)
    await store.write_batch([item(env("CC1", "status", 100, status="busy", battery_level=90,
                                      is_charging=True, charge_state="charging"))])
    notice = env("CC1", "event", 110, "robotErrorNotice", event_id="n1", event_level="info",
                 event_type="LowBattery", battery_level=58, x=-1.0, y=4.99104, yaw=1.3,
                 map_name="floor1", task_id="t9")
    await store.write_batch([item(notice)])
    r = await robot(store, "CC1")
    assert (r["status"], r["battery_level"], r["x"], r["y"], r["yaw"], r["is_charging"]) == (
        "busy", 58, -1.0, 4.99104, 1.3, True)
    # a late notice (older robot time) feeds nothing, but its event is kept
    late = env("CC1", "event", 50, "robotErrorNotice", event_id="n0", event_level="high",
               battery_level=5, x=0.0, y=0.0)
    await store.write_batch([item(late)])
    r = await robot(store, "CC1")
    assert (r["battery_level"], r["x"]) == (58, -1.0)
    assert [e["event_id"] for e in await store.get_events("CC1")] == ["n1", "n0"]


async def test_gateway_and_shop_messages_go_to_the_log_only(store: SqlStore, db_url: str) -> None:
    presence = env("gw1", "presence", 5, "presence", gateway="gw1")
    shop = env("gw1", "callback/mapElementChange", 6, "mapElementChange", gateway="gw1",
               map_name="m")
    task = env("T1", "task", 7, task_id="x", task_status="begin")
    result = await store.write_batch([item(presence), item(shop), item(task)])
    assert (result.logged, result.robots) == (3, 1)
    assert [r["robot_sn"] for r in await store.get_robots()] == ["T1"]  # seen, no state
    assert (await robot(store, "T1"))["status"] is None
    assert len(query(db_url, "SELECT id FROM mqtt_message_log")) == 3


# -- idempotence -------------------------------------------------------------------------

async def test_duplicate_events_and_envelopes_insert_nothing_twice(
    store: SqlStore, db_url: str
) -> None:
    batch = [item(env("D", "event", 5 + i, event_id=f"e{i}", event_level="high",
                      event_detail=f"detail {i}")) for i in range(5)]
    first = await store.write_batch(batch)
    assert first == BatchResult(messages=5, logged=5, events=5, robots=1)
    again = await store.write_batch(batch)  # a QoS 1 redelivery of the whole batch
    assert (again.logged, again.events, again.duplicates) == (0, 0, 5)
    await store.write_batch(batch[2:] + batch[:2] + batch[:1])  # reordered, repeated inside
    # the same event under a new envelope id (the agent re-sent the callback): one event
    copy = env("D", "event", 5, event_id="e0", event_level="high")
    assert (await store.write_batch([item(copy)])).events == 0
    assert len(query(db_url, "SELECT * FROM mnt_robot_events")) == 5
    assert len(query(db_url, "SELECT * FROM mqtt_message_log")) == 6
    events = await store.get_events("D", limit=2)
    assert [e["event_id"] for e in events] == ["e4", "e3"]  # newest robot time first
    assert events[0]["task_time"] == "2023-11-14T22:13:29.000Z"
    assert events[0]["event_detail"] == "detail 4"


def workload(n: int, seed: int = 3) -> list[tuple[str, Envelope]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        sn = f"R{i % 7}"
        kind = rng.choice(["status", "power", "pose", "event", "notice", "move", "task"])
        ts = 1_700_000_000 + i + rng.random() / 2  # distinct robot times
        if kind == "notice":
            e = env(sn, "event", ts, "robotErrorNotice", event_id=f"n{i}", event_level="info",
                    battery_level=i % 100, x=float(i), y=1.0, yaw=0.5)
        else:
            choices: dict[str, dict[str, Any]] = {
                "status": {"status": rng.choice(["idle", "busy"]), "battery_level": i % 100,
                           "is_charging": rng.random() < 0.5},
                "power": {"battery_level": i % 100,
                          "charge_state": rng.choice(["idle", "charging"])},
                "pose": {"x": float(i), "y": float(-i), "yaw": 1.0},
                "event": {"event_id": f"e{i}", "event_level": "warning"},
                "move": {"move_state": rng.choice(["moving", "idle"])},
                "task": {"task_id": f"t{i}", "task_status": "begin"},
            }
            e = env(sn, kind, ts, gateway=f"gw{i % 2}", **choices[kind])
        items.append(item(e))
    return items


async def snapshot(s: SqlStore) -> tuple[list[Any], list[Any]]:
    robots = await s.get_robots()
    events = [e for r in robots for e in await s.get_events(r["robot_sn"], 1000)]
    for e in events:
        e.pop("upload_time")
    return robots, events


async def test_shuffled_split_and_replayed_delivery_equals_in_order(
    tmp_path: Path, db_url: str
) -> None:
    items = workload(500)
    async with open_store(f"sqlite:///{tmp_path / 'in-order.db'}") as s:
        for one in items:
            await s.write_batch([one])
        expected = await snapshot(s)
    shuffled = items[:]
    random.Random(11).shuffle(shuffled)
    async with open_store(db_url) as s:
        for i in range(0, len(shuffled), 37):
            await s.write_batch(shuffled[i:i + 37])
        replay = shuffled[:200]
        random.Random(12).shuffle(replay)
        assert (await s.write_batch(replay)).duplicates == 200  # replay after an outage
        got = await snapshot(s)
    assert got == expected
    assert len(query(db_url, "SELECT id FROM mqtt_message_log")) == 500


async def test_two_replicas_writing_concurrently_do_not_deadlock(db_url: str) -> None:
    items = workload(600, seed=5)
    async with open_store(db_url) as a, open_store(db_url) as b:

        async def feed(s: SqlStore, part: list[tuple[str, Envelope]]) -> None:
            for i in range(0, len(part), 20):
                await s.write_batch(part[i:i + 20])

        shuffled = items[:]
        random.Random(2).shuffle(shuffled)
        await asyncio.gather(feed(a, shuffled[::2]), feed(b, shuffled[1::2]))
        got = await snapshot(a)
    async with open_store("sqlite:///:memory:") as ref:
        await ref.write_batch(items)
        assert got == await snapshot(ref)


async def test_bare_envelopes_are_accepted(store: SqlStore, db_url: str) -> None:
    e = env("E", "power", 3, battery_level=33)
    assert (await store.write_batch([e])).logged == 1
    assert (await robot(store, "E"))["battery_level"] == 33
    assert query(db_url, "SELECT topic FROM mqtt_message_log") == [
        {"topic": "org/acme/device/E/power"}]
    assert await store.write_batch([]) == BatchResult(0, 0, 0, 0)


async def test_values_the_database_would_refuse_never_stall_the_stream(
    store: SqlStore, db_url: str
) -> None:
    """A batch that fails forever would block every later message: coerce instead."""
    hostile = [
        item(env("H", "status", 10, status="x" * 500, battery_level=10**12,
                 is_charging=-1, move_state={"nested": [1, 2]})),
        item(env("H", "pose", 11, x=math.nan, y=1.0)),  # no position without x
        item(env("H", "power", 12, battery_level="full", charge_state="\udc80bad")),
        item(env("H" * 300, "event", 13, event_id="i" * 400, event_level="CRITICAL-ish" * 5,
                 event_detail="d" * 100_000)),
        # no robot time: since issue 24 it ranks equal to the robot's newest, so it is
        # taken (the newest received) but never outranks a later timed message
        item(env("H", "move", math.nan, move_state="lost")),
        item(env("HF", "status", 1e30, status="future")),  # beyond DATETIME: skewed, as now
    ]
    result = await store.write_batch(hostile)
    assert (result.logged, result.skewed) == (6, 1)
    assert (await robot(store, "HF"))["status"] == "future"
    r = await robot(store, "H")
    assert r["status"] == "x" * 32 and r["battery_level"] is None and r["is_charging"] is False
    assert r["x"] is None and r["charge_state"] == "?bad"
    assert r["last_ts"] == T0 + 12 and r["move_state"] == "lost"
    events = query(db_url, "SELECT robot_sn, event_id FROM mnt_robot_events")
    assert len(events[0]["robot_sn"]) == MAX_SN_BYTES and len(events[0]["event_id"]) == 128
    assert (await store.write_batch(hostile)).logged == 0  # and still idempotent


# -- targets -----------------------------------------------------------------------------

async def test_every_configured_target_is_written(tmp_path: Path, db_url: str) -> None:
    mysql = db_url.startswith("mysql")
    with extra_mysql_database() if mysql else nullcontext("analytics") as extra:
        cfg = tmp_path / "database_config.yaml"
        cfg.write_text(f"""
databases: [main, {extra}]
tables:
  robot_status:
    - {{table_name: mnt_robots_management, primary_keys: [robot_sn]}}
    - {{database: {extra}, table_name: robot_state_copy, primary_keys: [robot_sn]}}
  robot_events:
    - {{table_name: mnt_robot_events, primary_keys: [robot_sn, event_id]}}
    - {{database: {extra}, table_name: mnt_robot_events, primary_keys: [event_id, robot_sn]}}
""")
        targets = load_targets(cfg)
        assert targets.robot_status == (Table(None, "mnt_robots_management"),
                                        Table(extra, "robot_state_copy"))
        async with open_store(db_url, targets=targets) as s:
            result = await s.write_batch([
                item(env("E", "status", 1, status="idle")),
                item(env("E", "event", 2, event_id="x", event_level="info"))])
            assert (result.events, result.robots) == (1, 1)
            for table in ("mnt_robots_management", f"{extra}.robot_state_copy",
                          "mnt_robot_events", f"{extra}.mnt_robot_events"):
                rows = await s.backend.fetch(f"SELECT robot_sn FROM {s.dialect.quote(table)}")
                assert [r["robot_sn"] for r in rows] == ["E"], table
            copy = await s.backend.fetch(
                f"SELECT status FROM {s.dialect.quote(extra + '.robot_state_copy')}")
            assert copy == [{"status": "idle"}]
        if not mysql:
            assert (tmp_path / "analytics.db").exists()  # attached beside the main file


def test_targets_file_format_and_errors(tmp_path: Path) -> None:
    example = load_targets(EXAMPLES / "database_config.yaml")
    assert [t.qualified for t in example.robot_events] == [
        "fleet.mnt_robot_events", "analytics.mnt_robot_events"]
    assert example.databases == {"fleet", "analytics"}
    cfg = tmp_path / "db.yaml"
    cfg.write_text("tables:\n  robot_events:\n    - {table_name: ev}\n")
    only_events = load_targets(cfg)
    assert only_events.robot_status == Targets().robot_status  # left out: the default
    for body, message in [
        ("tables:\n  robot_status:\n    - {table_name: 'x; DROP TABLE y'}\n", "identifier"),
        ("tables:\n  robot_status:\n    - {table_name: t, primary_keys: [id]}\n",
         "primary_keys must be"),
        ("tables:\n  robot_status: []\n", "empty"),
        ("databases: []\n", "tables"),
        ("tables: [1\n", "cannot read"),
    ]:
        cfg.write_text(body)
        with pytest.raises(ConfigError, match=message):
            load_targets(cfg)
    with pytest.raises(ConfigError, match="cannot read"):
        load_targets(tmp_path / "missing.yaml")


def test_unknown_database_url_is_a_config_error() -> None:
    for url in ("postgres://x/y", "nonsense", "mysql://host-without-db", "sqlite://"):
        with pytest.raises(ConfigError, match="DATABASE_URL"):
            open_store(url)


# -- dead letters and existing deployments -----------------------------------------------

async def test_dead_letter_is_recorded(store: SqlStore, db_url: str) -> None:
    await store.dead_letter("org/acme/device/x/status", b"\xffnot json", "envelope is not JSON")
    rows = query(db_url, "SELECT id, topic, payload, reason, created_at FROM mqtt_dead_letters")
    assert len(rows) == 1
    assert (rows[0]["topic"], rows[0]["payload"], rows[0]["reason"]) == (
        "org/acme/device/x/status", "\\xffnot json", "envelope is not JSON")
    assert rows[0]["created_at"] is not None


async def test_retention_prunes_old_log_rows_in_batches_and_nothing_else(
        store: SqlStore, db_url: str) -> None:
    batch = [item(env(f"R{i}", "status", 10 + i, status="Idle")) for i in range(7)]
    batch.append(item(env("R0", "event", 20, event_id="e1", event_level="high")))
    await store.write_batch(batch)
    await store.dead_letter("org/acme/device/x/status", b"junk", "envelope is not JSON")
    retention = Retention(store, {LOG_TABLE: 1.0, DEAD_TABLE: 0.0, COMMAND_TABLE: 1.0},
                          interval=3600, batch=3)
    assert await retention.prune_once() == 0  # nothing is a day old yet
    assert await retention.prune_once(now=time.time() + 2 * 86400) == 8
    assert retention.pruned == {LOG_TABLE: 8, COMMAND_TABLE: 0}
    assert query(db_url, "SELECT id FROM mqtt_message_log") == []
    assert len(query(db_url, "SELECT id FROM mqtt_dead_letters")) == 1  # 0 days: forever
    assert len(await store.get_robots()) == 7  # state and events are never pruned
    assert len(await store.get_events("R0")) == 1


LEGACY = ("CREATE TABLE mnt_robots_management (robot_sn VARCHAR(64) PRIMARY KEY,"
          " status VARCHAR(20), battery_level INT, water_level INT, sewage_level INT,"
          " x DOUBLE, y DOUBLE, z DOUBLE, yaw DOUBLE, charge_state VARCHAR(64),"
          " last_updated DATETIME)")


async def test_an_existing_table_is_written_as_it_is_and_never_altered(db_url: str) -> None:
    """Contract change (issue 21): a table the product did not create gains no columns;
    it is written in its own shape, and its rows never go backwards in robot time."""
    query(db_url, LEGACY)
    query(db_url, "INSERT INTO mnt_robots_management (robot_sn, status, water_level,"
                  " battery_level, last_updated) VALUES ('OLD', 'idle', 40, 77,"
                  " '2023-11-14 22:15:00')")
    query(db_url, "CREATE TABLE mnt_robot_events (robot_sn VARCHAR(64), event_id VARCHAR(128),"
                  " event_level VARCHAR(16), event_type VARCHAR(128), event_detail TEXT,"
                  " task_time DATETIME, upload_time DATETIME, PRIMARY KEY (robot_sn, event_id))")
    before = (column_names(db_url, "mnt_robots_management"),
              column_names(db_url, "mnt_robot_events"))
    async with open_store(db_url) as s:
        await s.migrate()
        # the legacy row's last_updated (robot time 100): an older message leaves it be
        await s.write_batch([item(env("OLD", "power", 50, battery_level=9))])
        legacy = query(db_url, "SELECT * FROM mnt_robots_management")
        assert (legacy[0]["battery_level"], legacy[0]["water_level"]) == (77, 40)
        await s.write_batch([item(env("OLD", "status", 150, status="busy-" + "y" * 40,
                                      battery_level=8))])
        await s.write_batch([item(env("OLD", "event", 151, event_id="e", event_level="info"))])
        assert len(await s.get_events("OLD")) == 1
    assert (column_names(db_url, "mnt_robots_management"),
            column_names(db_url, "mnt_robot_events")) == before
    r = query(db_url, "SELECT * FROM mnt_robots_management")[0]
    # legacy columns untouched; a value longer than the legacy VARCHAR(20) is cut to fit
    assert (r["status"], r["water_level"], r["battery_level"]) == ("busy-" + "y" * 15, 40, 8)
    assert str(r["last_updated"]).startswith("2023-11-14 22:15:51")  # the event, last
    events = query(db_url, "SELECT event_id, event_level FROM mnt_robot_events")
    assert events == [{"event_id": "e", "event_level": "info"}]


async def test_a_table_without_the_key_is_refused_with_a_clear_error(db_url: str) -> None:
    query(db_url, LEGACY.replace(" PRIMARY KEY", ""))
    async with open_store(db_url) as s:
        with pytest.raises(StoreError, match=r"no primary key or unique index on \(robot_sn\)"):
            await s.migrate()


async def test_commands_are_recorded_once(store: SqlStore, db_url: str) -> None:
    from bridge.commands import Command, CommandOutcome, Response

    cmd = Command("ping", {"a": 1})
    outcome = CommandOutcome(cmd, "gw1", "acme", Response(cmd.message_id, "success", {"ok": 1}),
                             time.time(), 12.5)
    await store.record_command(outcome)
    await store.record_command(outcome)
    rows = query(db_url, "SELECT command, outcome, rtt_ms FROM device_commands")
    assert rows == [{"command": "ping", "outcome": "success", "rtt_ms": 12.5}]


# -- outages -----------------------------------------------------------------------------

async def test_unreachable_mysql_is_a_clear_store_error() -> None:
    start = time.monotonic()
    async with open_store("mysql://root:secret@127.0.0.1:1/test") as s:
        assert await s.ping() is False
        with pytest.raises(StoreError, match=r"cannot reach MySQL at 127\.0\.0\.1:1/test") as err:
            await s.write_batch([item(env("A", "status", 1, status="idle"))])
        assert "secret" not in str(err.value)
        assert isinstance(err.value.__cause__, pymysql.err.OperationalError)
    assert time.monotonic() - start < 10


async def test_a_silent_mysql_server_times_out_instead_of_hanging() -> None:
    import socket

    with socket.socket() as silent:  # accepts the TCP connection, never says hello
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = time.monotonic()
        async with open_store(f"mysql://root:@127.0.0.1:{port}/test?timeout=1") as s:
            with pytest.raises(StoreError, match=f"127.0.0.1:{port}/test"):
                await s.write_batch([item(env("A", "status", 1, status="idle"))])
        assert time.monotonic() - start < 5


async def test_mysql_going_away_mid_run_fails_the_batch_then_recovers(tmp_path: Path) -> None:
    from tests.support.mariadb_proc import MariadbProcess

    db = MariadbProcess(tmp_path / "db")
    db.start()
    try:
        async with open_store(db.url) as s:
            await s.write_batch([item(env("A", "power", 1, battery_level=1))])
            db.stop()  # every pooled connection is now dead
            with pytest.raises(StoreError):
                await s.write_batch([item(env("A", "power", 2, battery_level=2))])
            assert await s.ping() is False
            db.start()
            batch = [item(env("A", "power", 3, battery_level=3))]
            await s.write_batch(batch)
            assert (await s.write_batch(batch)).duplicates == 1
            assert (await robot(s, "A"))["battery_level"] == 3
            assert await s.ping() is True
    finally:
        db.stop()


async def test_sqlite_in_an_unwritable_place_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    async with open_store(f"sqlite:///{blocker}/sub/store.db") as s:
        assert await s.ping() is False
        with pytest.raises(StoreError, match="SQLite"):
            await s.write_batch([item(env("A", "status", 1, status="idle"))])


# -- the pure fold -------------------------------------------------------------------------

def test_fold_keeps_the_newest_value_of_each_group_per_robot() -> None:
    items = [
        item(env("A", "status", 5, status="idle", battery_level=50, msg_id="m1")),
        item(env("A", "power", 9, battery_level=40, msg_id="m2")),
        item(env("A", "pose", 7, x=1.0, y=2.0, msg_id="m3")),
        item(env("A", "power", 8, battery_level=45, charge_state="full", msg_id="m4")),
        item(env("A", "status", 9, status="busy", msg_id="m5")),  # equal ts: later wins
        item(env("A", "status", 9, status="idle", msg_id="m5")),  # same id: logged once
    ]
    rows = build_rows(items, now=T0 + 60)
    assert [r[0] for r in rows.log] == ["m1", "m2", "m3", "m4", "m5"]
    assert len(rows.robots) == 1
    row = dict(zip(ROBOT_ROW, rows.robots[0], strict=True))
    assert (row["status"], row["status_ts"]) == ("idle", T0 + 9)
    assert (row["battery_level"], row["battery_ts"]) == (40, T0 + 9)
    assert (row["charge_state"], row["charge_ts"]) == ("full", T0 + 8)
    assert (row["x"], row["y"], row["pose_ts"]) == (1.0, 2.0, T0 + 7)
    assert (row["move_state"], row["move_ts"]) == (None, None)  # not seen: left alone
    assert (row["last_ts"], row["last_updated"]) == (T0 + 9, "2023-11-14 22:13:29.000")


def test_long_keys_are_shortened_without_collisions() -> None:
    a, b = key("x" * 100 + "a", 64), key("x" * 100 + "b", 64)
    assert len(a) == len(b) == 64 and a != b and key("x" * 100 + "a", 64) == a
    assert key("short", 64) == "short"
    assert when(None) is None


@given(st.floats(-1e10, 253402300799.0) | st.integers(0, 2**31).map(lambda ms: ms / 1000)
       # just under a second, where the microseconds round up into the next one
       | st.integers(-2**33, 2**33).map(lambda s: s - 1e-7))
@settings(max_examples=500, deadline=None)
def test_when_writes_what_datetime_writes(ts: float) -> None:
    expected = dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    assert when(ts) == expected


@pytest.fixture(params=["", "NO_BACKSLASH_ESCAPES"])
async def mysql_session(request: pytest.FixtureRequest,
                        mariadb_url: str) -> AsyncIterator[aiomysql.Connection]:
    """A MariaDB session with the server's sql_mode, then one where a backslash in a
    string literal is an ordinary character."""
    conn = await aiomysql.connect(host="127.0.0.1", user="root", password="", db="test",
                                  charset="utf8mb4")
    try:
        if request.param:
            async with conn.cursor() as cur:
                await cur.execute(f"SET SESSION sql_mode = CONCAT_WS(',', "
                                  f"NULLIF(@@SESSION.sql_mode, ''), '{request.param}')")
        yield conn
    finally:
        conn.close()


_LITERAL_VALUES = (st.none() | st.integers(-2**63, 2**63 - 1) | st.booleans()
                   | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
                   | st.sampled_from(["", "\0", "'", "\\", "\\'", "''", '"', "%s", "é😀",
                                      "a\nb\r\t\x1a", "\\\\%_"]))


@pytest.mark.integration
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_LITERAL_VALUES, min_size=1, max_size=12))
async def test_values_inlined_in_statements_read_back_as_they_were(
        mysql_session: aiomysql.Connection, values: list[Any]) -> None:
    """The MySQL backend writes its statements' values as literals itself (faster than
    the driver): whatever the text (quotes, backslashes, NUL, emoji) and whichever the
    escaping mode, the server reads each value back as it was."""
    async with mysql_session.cursor() as cur:
        await cur.execute(_mogrify(mysql_session, "SELECT " + ", ".join(["%s"] * len(values)),
                                   values))
        got = list(await cur.fetchone())
    assert got == [int(v) if isinstance(v, bool) else v for v in values]


def test_mysql_statements_are_folded_into_multi_row_inserts() -> None:
    """aiomysql's executemany sends one multi-row INSERT only for statements its regex
    recognises; anything else silently becomes one round trip per row."""
    from aiomysql.cursors import RE_INSERT_VALUES

    store = open_store("mysql://root:@127.0.0.1:3306/test",
                       targets=Targets(robot_events=(Table(None, "a"), Table("db2", "b"))))
    statements = [store._log_sql, store._event_sql, store.dialect.robot_upsert("robot_state", 2e9)]
    assert all(RE_INSERT_VALUES.match(sql) for sql in statements)


# -- time sanity ------------------------------------------------------------------------------
async def test_far_future_time_does_not_freeze_a_robot(store: SqlStore) -> None:
    first = await store.write_batch([item(env("F1", "status", 9_999_999_999.0, status="stuck"))])
    result = await store.write_batch([item(env("F1", "status", time.time(), status="idle"))])
    assert (await robot(store, "F1"))["status"] == "idle"
    assert (first.skewed, result.skewed) == (1, 0)


async def test_a_robot_frozen_by_an_old_far_future_row_recovers(db_url: str) -> None:
    # A store without the rule (as before it existed) writes the bad row...
    async with open_store(db_url, max_skew=1e12) as old:
        await old.write_batch([item(env("F2", "status", 4_102_444_800.0, status="stuck",
                                        battery_level=5))])
    async with open_store(db_url) as new:
        # ...and the next sane message of each state group moves the robot again.
        now = time.time()
        await new.write_batch([item(env("F2", "status", now, status="idle",
                                        battery_level=90))])
        row = await robot(new, "F2")
    assert (row["status"], row["battery_level"]) == ("idle", 90)
    assert row["last_ts"] == pytest.approx(now)


async def test_dead_letters_are_kept_once_per_topic_and_payload(store: SqlStore) -> None:
    await store.dead_letters([("org/a/device/b/c", b"junk", "not JSON")] * 2)
    await store.dead_letter("org/a/device/b/c", b"junk", "not JSON, seen again")
    await store.dead_letter("org/a/device/b/c", b"junk2", "not JSON")
    rows = await store.backend.fetch("SELECT payload FROM mqtt_dead_letters ORDER BY payload")
    assert [r["payload"] for r in rows] == ["junk", "junk2"]


# -- history (the console's chart and tracks) ---------------------------------------------

async def test_history_keeps_every_status_change_and_a_point_a_minute(
        store: SqlStore, db_url: str) -> None:
    t0 = 1_700_000_000.0
    await store.write_batch([item(env("H", "status", t0, status="idle")),
                             item(env("H", "power", t0, battery_level=90))])
    for i in range(1, 19):  # a pose every 10 s for three minutes, one batch each
        await store.write_batch([item(env("H", "pose", t0 + 10 * i, x=float(i), y=0.0,
                                          yaw=0.0))])
        if i == 6:  # mid-minute: a status change is a point of its own
            await store.write_batch([item(env("H", "status", t0 + 65, status="working"))])
    await store.write_batch([item(env("H", "power", t0 + 181, battery_level=80,
                                      charge_state="charging"))])  # charge changed
    items, after = await store.list_history("H", since=0, limit=100)
    assert after is None
    # the minute counts from the last point, whatever made it
    assert [p["ts"] for p in items] == [t0, t0 + 60, t0 + 65, t0 + 130, t0 + 181]
    assert [p["status"] for p in items] == ["idle", "idle", "working", "working", "working"]
    assert (items[-1]["battery_level"], items[-1]["charge_state"]) == (80, "charging")
    assert (items[1]["x"], items[1]["org_id"]) == (6.0, "acme")
    # redelivery and replays add nothing; the page and since work
    await store.write_batch([item(env("H", "status", t0 + 65, status="working"))])
    assert len((await store.list_history("H", since=0, limit=100))[0]) == 5
    page, after = await store.list_history("H", since=t0 + 1, limit=2)
    assert [p["ts"] for p in page] == [t0 + 60, t0 + 65] and after == [t0 + 65]
    page, after = await store.list_history("H", since=t0 + 1, limit=2, after=after[0])
    assert [p["ts"] for p in page] == [t0 + 130, t0 + 181]
    # a robot time far ahead of this clock is charted at the server's time instead
    await store.write_batch([item(env("F", "status", time.time() + 86400, status="idle"))])
    [point], _ = await store.list_history("F", since=0, limit=10)
    assert point["ts"] <= time.time()
    # tracks: positions by robot, oldest first, only the orgs asked for
    tracks = await store.recent_positions(since=time.time() - 60, orgs={"acme"})
    # (keyed "org/sn" since issue 24: two orgs' robots may share an sn)
    h = tracks["acme/H"]
    assert h[:2] == [[6.0, 0.0], [6.0, 0.0]] and h[-1] == [18.0, 0.0]
    assert await store.recent_positions(since=time.time() - 60, orgs={"beta"}) == {}
    # retention like the log's
    retention = Retention(store, {"robot_history": 1.0}, interval=3600, batch=4)
    assert await retention.prune_once() == 0
    assert await retention.prune_once(now=time.time() + 2 * 86400) == 6  # H and F
    assert (await store.list_history("H", since=0, limit=10))[0] == []


async def test_replayed_state_is_charted_in_the_gap_but_never_merged(
        store: SqlStore) -> None:
    """After an outage the edge sends each robot's newest state first and the superseded
    messages after it, marked ``replay`` (issue 27): those fill the chart's gap under the
    live rule (a point a minute, each status or charge change at once), values a
    replayed message lacks taken from the point before, and the robot stays as it is."""
    t0 = 1_700_000_000.0
    await store.write_batch([item(env("G", "status", t0, status="idle", battery_level=90))])
    await store.write_batch([item(env("G", "status", t0 + 600, status="working",
                                      battery_level=40))])  # newest state, first

    def replayed(e: Envelope) -> tuple[str, Envelope]:
        return item(dataclasses.replace(e, replay=True))

    gap = [replayed(env("G", "pose", t0 + 10 * i, x=float(i), y=1.0, yaw=0.5))
           for i in range(1, 59)]
    gap += [replayed(env("G", "power", t0 + 120 * i + 5, battery_level=90 - 10 * i))
            for i in range(1, 5)]
    gap.append(replayed(env("G", "status", t0 + 305, status="error")))
    gap.sort(key=lambda it: it[1].ts)
    await store.write_batch(gap[:31])  # a drain's batches split anywhere
    await store.write_batch(gap[31:])
    points, _ = await store.list_history("G", since=0, limit=100)
    ts = [p["ts"] - t0 for p in points]
    assert ts[0] == 0 and ts[-1] == 600 and 305 in ts, ts
    steps = [(b - a, q["status"] != p["status"]) for a, b, p, q in
             zip(ts, ts[1:], points, points[1:], strict=False)]
    # about a point a minute (never closer unless the status changed, never a gap the
    # replayed messages did not leave), so 10 or 11 points, not 63
    assert all(60 <= step <= 70 or changed for step, changed in steps[:-1]), steps
    assert [p["status"] for p in points] == \
        ["idle"] * ts.index(305) + ["error"] * (len(ts) - ts.index(305) - 1) + ["working"]
    first = points[1]  # a pose: status and battery carried over from the point before
    assert (first["status"], first["battery_level"], first["y"]) == ("idle", 90, 1.0)
    assert first["x"] == (first["ts"] - t0) / 10
    assert points[-2]["battery_level"] == 50  # the last power message of the gap
    row = await robot(store, "G")
    assert (row["status"], row["battery_level"], row["x"]) == ("working", 40, None)
    # the whole drain again (a retried batch, a QoS 1 redelivery) adds nothing
    await store.write_batch(gap)
    assert len((await store.list_history("G", since=0, limit=100))[0]) == len(points)


async def test_tracks_of_two_orgs_robots_with_one_sn_stay_apart(store: SqlStore) -> None:
    now = time.time()
    a = env("S", "pose", now - 5, x=1.0, y=1.0, yaw=0.0)
    b = dataclasses.replace(env("S", "pose", now - 4, x=50.0, y=50.0, yaw=0.0), org="beta")
    await store.write_batch([item(a), item(b)])
    tracks = await store.recent_positions(since=now - 60)
    assert tracks == {"acme/S": [[1.0, 1.0]], "beta/S": [[50.0, 50.0]]}
    assert await store.recent_positions(since=now - 60, orgs={"beta"}) == {
        "beta/S": [[50.0, 50.0]]}


async def test_robots_are_read_by_org_and_sn_not_by_sn_across_orgs(store: SqlStore) -> None:
    """The console's per-tick read: the robots asked for and no other org's robot that
    shares an sn, each found by the primary key rather than by reading the table."""
    now = time.time()
    fleet = [env(f"F{i:03d}", "status", now - 5, status="idle") for i in range(300)]
    beta = dataclasses.replace(env("F007", "status", now - 4, status="busy"), org="beta")
    await store.write_batch([item(e) for e in [*fleet, beta]])
    sent: list[tuple[str, list[Any]]] = []
    fetch = store.backend.fetch

    async def spy(sql: str, args: Any = ()) -> list[dict[str, Any]]:
        sent.append((sql, list(args)))
        return await fetch(sql, args)

    store.backend.fetch = spy  # type: ignore[method-assign]
    rows = await store.get_robots_of({("acme", "F123"), ("beta", "F007"), ("beta", "F008")})
    store.backend.fetch = fetch  # type: ignore[method-assign]
    assert [(r["org_id"], r["robot_sn"], r["status"]) for r in rows] == [
        ("beta", "F007", "busy"), ("acme", "F123", "idle")]
    [(sql, args)] = sent
    assert await scans(store.backend, sql, args) == []


async def test_a_batch_projects_its_robots_by_key_into_the_targets(store: SqlStore) -> None:
    """Each target's projection (an INSERT ... SELECT of the batch's robots and events)
    looks them up by key: on SQLite, left to choose its join order, it read every claim
    of the target for each batch, so a fleet's batches slowed as it grew (15,000 robots
    in batches of 5,000: 3.1, 5.3 and 7.7 s a batch, against 1.0 s each by key)."""
    now = time.time()
    await store.write_batch([item(env(f"P{i:03d}", "status", now - 5, status="idle"))
                             for i in range(600)])
    sent: list[Statement] = []
    read_then_write = store.backend.read_then_write

    async def spy(reads: Sequence[Query], statements: Sequence[Statement],
                  ) -> tuple[list[dict[str, Any]], list[int]]:
        sent.extend(statements)
        return await read_then_write(reads, statements)

    store.backend.read_then_write = spy  # type: ignore[method-assign]
    await store.write_batch([
        *(item(env(f"P{i:03d}", "status", now - 1, status="busy")) for i in range(0, 600, 2)),
        item(env("P123", "event", now - 1, event_id="x7", event_level="info"))])
    store.backend.read_then_write = read_then_write  # type: ignore[method-assign]
    projections = [(sql, rows) for sql, rows in sent if " SELECT " in sql and rows
                   and any(f"INTO {store.dialect.quote(t)}" in sql
                           for t in ("mnt_robots_management", "mnt_robot_events"))]
    assert len(projections) == 2, [sql[:60] for sql, _ in sent]
    for sql, rows in projections:
        assert rows is not None
        assert await scans(store.backend, sql, rows[0]) == [], sql[:80]


async def test_recent_events_are_newest_first_and_scoped(store: SqlStore) -> None:
    await store.write_batch([item(env("E1", "event", 10, event_id="a", event_level="high"))])
    await store.write_batch([item(env("E2", "event", 50, event_id="b", event_level="info"))])
    events = await store.recent_events(limit=10, orgs={"acme"})
    assert [e["event_id"] for e in events] == ["b", "a"]  # newest received first
    assert await store.recent_events(limit=10, orgs={"beta"}) == []
    assert len(await store.recent_events(limit=1)) == 1


async def test_tasks_keep_each_tasks_newest_state(store: SqlStore) -> None:
    started = 1_700_000_000
    run: dict[str, Any] = {"task_id": "t1", "task_name": "Lobby", "task_time": started}
    await store.write_batch([item(env("T", "task", started + 10, **run, task_status="running")),
                             item(env("T", "task", started + 5, **run, task_status="start"))])
    await store.write_batch([item(env("T", "task", started + 1, **run, task_status="queued"))])
    await store.write_batch([item(env("T", "task", started + 99, task_name="Hall",
                                      task_time=started + 90, task_status="done"))])
    await store.write_batch([item(env("T", "task", started + 99, task_status="x"))])  # no id
    tasks = await store.list_tasks("T", limit=10)
    assert [(t["task_id"], t["task_name"], t["task_status"]) for t in tasks] == [
        (None, "Hall", "done"), ("t1", "Lobby", "running")]  # older news changes nothing
    assert (tasks[1]["ts"], tasks[1]["task_time"], tasks[1]["org_id"]) == (
        started + 10, started, "acme")
    await store.write_batch([item(env("T", "task", started + 120, **run, task_status="done"))])
    assert [t["task_status"] for t in await store.list_tasks("T", limit=10)] == ["done", "done"]


# -- robot clocks (issue 24, bridge/clock.py) -------------------------------------------------
def stamped(sn: str, ts: float | None, received: float, **data: Any) -> tuple[str, Envelope]:
    """A status message with robot time ``ts`` (None: none; the gateway's time stands in,
    which is how an envelope says it has no robot time); received (a fraction later) at
    gateway time ``received``."""
    e = env(sn, "status", received, **data)
    if ts is None:
        e = e.with_notes("ts: no robot time in the callback; received_at stands in")
    return item(dataclasses.replace(e, ts=received if ts is None else ts,
                                    received_at=received if ts is None else received + 0.125))


async def test_a_robot_whose_clock_resets_keeps_moving(store: SqlStore, db_url: str) -> None:
    now = time.time()
    for i in range(3):
        await store.write_batch([stamped("RC", now - 100 + i, now - 100 + i, status=f"a{i}")])
    seen = []
    # then 1970, then times counting up from 2001: each message moves the state
    for i, ts in enumerate((5.0, 978_307_200.0, 978_307_201.0, 978_307_202.0)):
        await store.write_batch([stamped("RC", ts, now - 50 + i, status=f"b{i}")])
        seen.append((await robot(store, "RC"))["status"])
    assert seen == ["b0", "b1", "b2", "b3"]
    logged = [strict_loads(r["payload"]).value for r in query(
        db_url, "SELECT payload FROM mqtt_message_log WHERE device_id = 'RC'")]
    [b1] = [e for e in logged if e["data"].get("status") == "b1"]
    assert "implausible" in b1["notes"][0]  # the 2001 time, noted in the envelope
    # a late retry of an old, correctly timed message still changes nothing
    await store.write_batch([stamped("RC", now - 99, now - 99, status="a1")])
    assert (await robot(store, "RC"))["status"] == "b3"


async def test_a_plausible_clock_set_back_is_followed_once_confirmed(store: SqlStore) -> None:
    now = time.time()
    await store.write_batch([stamped("RB", now - 60, now - 60, status="before")])
    back = now - 60 - 86_400  # a day back, and staying there
    states = []
    for i in range(5):
        await store.write_batch([stamped("RB", back + i, now - 50 + i, status=f"after{i}")])
        states.append((await robot(store, "RB"))["status"])
    assert states == ["before", "before", "after2", "after3", "after4"]
    assert store.clocks.resets == 1


async def test_far_future_then_sane_in_the_same_second_and_untimed_then_lagging(
        store: SqlStore) -> None:
    now = float(int(time.time()))
    await store.write_batch([stamped("FS", now - 10, now - 10, status="old")])
    await store.write_batch([stamped("FS", 9_999_999_999.0, now + 0.25, status="future")])
    await store.write_batch([stamped("FS", now, now + 0.75, status="sane")])
    assert (await robot(store, "FS"))["status"] == "sane"
    # an untimed message, then a robot clock 2 s behind the gateway's: nothing dropped
    await store.write_batch([stamped("FS", None, now + 5, status="untimed")])
    assert (await robot(store, "FS"))["status"] == "untimed"
    await store.write_batch([stamped("FS", now + 3, now + 6, status="lagging")])
    assert (await robot(store, "FS"))["status"] == "lagging"


async def test_a_gateway_clock_an_hour_behind_does_not_stop_robot_states(
        store: SqlStore) -> None:
    now = time.time()
    for i in range(3):  # correct robot times, received_at an hour behind
        await store.write_batch([stamped("GB", now - 30 + i, now - 3600 - 30 + i,
                                         status=f"s{i}")])
        assert (await robot(store, "GB"))["status"] == f"s{i}"


async def test_an_envelope_without_received_at_is_still_ordered_by_its_time(
        store: SqlStore) -> None:
    # received_at defaults to ts when a producer leaves it out: still a robot time
    now = time.time()
    for ts, state in ((now - 5, "newer"), (now - 50, "older")):
        e = dataclasses.replace(env("NR", "status", ts, status=state), received_at=ts)
        await store.write_batch([item(e)])
    assert (await robot(store, "NR"))["status"] == "newer"


async def test_untimed_messages_delivered_again_or_out_of_order_leave_the_newest_state(
        store: SqlStore) -> None:
    """A message without a usable robot time (none, 1970, 2001) delivered again after a
    newer one (QoS 1 redelivery, same envelope id), or overtaken on the way, does not
    overwrite the state of the one the gateway received after it."""
    now = time.time()
    for n, untimed in enumerate((None, 12.0, 978_307_200.0)):
        sn = f"UR{n}"
        await store.write_batch([stamped(sn, now - 20, now - 20, status="sane")])
        a1, a2 = (stamped(sn, untimed, now + i, status=s) for i, s in ((0, "a1"), (5, "a2")))
        await store.write_batch([a1])
        await store.write_batch([a2])
        assert (await robot(store, sn))["status"] == "a2"
        await store.write_batch([a1])  # the same envelope again
        assert (await robot(store, sn))["status"] == "a2"
        await store.write_batch([stamped(sn, untimed, now + 3, status="a3")])  # overtaken
        assert (await robot(store, sn))["status"] == "a2"
        await store.write_batch([stamped(sn, untimed, now + 6, status="a4")])
        assert (await robot(store, sn))["status"] == "a4"
        # received before a later sane time, arriving after it
        await store.write_batch([stamped(sn, now + 8, now + 8, status="timed")])
        await store.write_batch([stamped(sn, untimed, now + 7, status="a5")])
        assert (await robot(store, sn))["status"] == "timed"
    # out of order in one batch, and in two: the one received last wins
    for sn, batches in (("UB", [[2, 1]]), ("UC", [[2], [1]])):
        await store.write_batch([stamped(sn, now - 20, now - 20, status="sane")])
        for batch in batches:
            await store.write_batch([stamped(sn, None, now + i, status=f"s{i}")
                                     for i in batch])
        assert (await robot(store, sn))["status"] == "s2"


async def test_a_robot_clock_reset_to_1970_is_counted_once(store: SqlStore) -> None:
    now = time.time()
    await store.write_batch([stamped("RZ", now - 30, now - 30, status="sane")])
    for i, ts in enumerate((3.0, 4.0, 978_307_200.0, 978_307_201.0)):
        await store.write_batch([stamped("RZ", ts, now - 20 + i, status=f"z{i}")])
    assert store.clocks.resets == 1
    await store.write_batch([stamped("RZ", now - 10, now - 10, status="right")])
    await store.write_batch([stamped("RZ", 5.0, now - 9, status="again")])
    assert store.clocks.resets == 2
    assert (await robot(store, "RZ"))["status"] == "again"


# -- what any text does to the log (MySQL takes values as literals the store writes) -----

_ANY_TEXT = st.text(st.characters(codec=None), max_size=40) | st.sampled_from(
    ["", "\0", "'", "\\", '"', "\\u0000", "%s", "é😀", "\ud800x", "$[0]", "a\nb\r\t"])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_ANY_TEXT, min_size=1, max_size=6))
async def test_any_text_reaches_the_log_as_built(store: SqlStore, texts: list[str]) -> None:
    """Each row of the log holds exactly what build_rows made of the envelope, whatever
    characters it carries (NUL, quotes, backslashes, lone surrogates, emoji): the
    literals the MySQL store writes lose or alter nothing."""
    batch = [item(dataclasses.replace(env("U", "status", 1000.0 + i, status=t, note=t),
                                      id=f"u-{uuid.uuid4().hex}-{t[:5]}", type=t or "x"))
             for i, t in enumerate(texts)]
    built = build_rows(batch, now=time.time()).log
    await store.write_batch(batch)
    ids = [row[0] for row in built]
    marks = ", ".join([store.dialect.mark] * len(ids))
    rows = await store.backend.fetch(
        f"SELECT id, topic, type, ts, payload FROM mqtt_message_log WHERE id IN ({marks})", ids)
    got = {r["id"]: (r["topic"], r["type"], r["ts"], r["payload"]) for r in rows}
    assert got == {row[0]: (row[1], row[2], row[6], row[9]) for row in built}


async def test_a_batch_larger_than_one_packet_is_stored_in_one_write(store: SqlStore) -> None:
    """200 envelopes of 100 KB each: their log rows, as one INSERT, are over MariaDB's
    default packet limit (16 MiB), so the store sends them as several in the same
    transaction; every row lands with its payload whole, none refused."""
    note = "é" * 50_000
    batch = [item(env(f"BIG{i % 7}", "status", 1000.0 + i, status="idle", note=note))
             for i in range(200)]
    result = await store.write_batch(batch)
    assert result.logged == 200
    ids = [e.id for _, e in batch]
    marks = ", ".join([store.dialect.mark] * len(ids))
    rows = await store.backend.fetch(
        f"SELECT id, payload FROM mqtt_message_log WHERE id IN ({marks})", ids)
    assert {r["id"]: r["payload"] for r in rows} == \
        {e.id: e.to_json().decode() for _, e in batch}


_STATE_TEXT = ("status", "charge_state", "move_state", "map_name")
_STATE_NUMBERS = ("battery_level", "is_charging", "x", "y", "z", "yaw", "last_ts")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_ANY_TEXT, min_size=1, max_size=4),
       numbers=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=4,
                        max_size=4))
async def test_any_state_reaches_the_robot_row_as_built(
        store: SqlStore, texts: list[str], numbers: list[float]) -> None:
    """Each robot's state row holds exactly what build_rows made of its messages, whatever
    their text and numbers."""
    x, y, z, yaw = numbers
    batch = []
    for i, t in enumerate(texts):
        sn = f"V{uuid.uuid4().hex[:12]}"
        batch += [item(env(sn, "status", 1000.0 + i, status=t, charge_state=t, move_state=t,
                           battery_level=i * 30, is_charging=i % 2)),
                  item(env(sn, "pose", 1001.0 + i, x=x, y=y, z=z, yaw=yaw, map_name=t))]
    built = {row[0]: dict(zip(ROBOT_ROW, row, strict=True))
             for row in build_rows(batch, now=time.time()).robots}
    await store.write_batch(batch)
    for sn, want in built.items():
        got = await robot(store, sn)
        assert {c: got[c] for c in _STATE_TEXT} == {c: want[c] for c in _STATE_TEXT}
        assert {c: None if got[c] is None else float(got[c]) for c in _STATE_NUMBERS} == \
            {c: None if want[c] is None else float(want[c]) for c in _STATE_NUMBERS}


async def test_a_read_leaves_nothing_open(store: SqlStore, db_url: str) -> None:
    """A read ends its transaction (MySQL: its COMMIT goes with the SELECT): the next
    read on the pool sees rows committed since, and another session may alter the
    table at once instead of waiting on the read's locks."""
    table = f"scratch_{uuid.uuid4().hex[:8]}"
    b, mark = store.backend, store.dialect.mark
    await b.transaction([(f"CREATE TABLE {table} (k VARCHAR(20) PRIMARY KEY)", None)])
    try:
        for k in ("a", "b", "c"):
            assert await b.fetch(f"SELECT k FROM {table} WHERE k <> {mark}", ("z",)) == [
                {"k": x} for x in "abc" if x < k]
            query(db_url, f"INSERT INTO {table} (k) VALUES ('{k}')")  # another session
        if db_url.startswith("mysql"):
            query(db_url, f"ALTER TABLE {table} WAIT 2 ADD COLUMN v INT")  # MariaDB's
        assert len(await b.fetch(f"SELECT * FROM {table}")) == 3
    finally:
        await b.transaction([(f"DROP TABLE {table}", None)])


async def test_a_batch_of_every_kind_is_one_round_trip_on_mysql(
        store: SqlStore, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's statements (rows bound to several INSERTs among them) and the check for
    ids already logged reach MySQL as one query: each round trip had waited for a busy
    event loop (5.4 a batch at saturation, and one more for the check)."""
    if not db_url.startswith("mysql"):
        pytest.skip("round trips are MySQL's")
    from callback_server.store import mysql
    queries: list[str] = []
    sent = mysql._QuietCursor.execute

    async def spy(cur: Any, sql: str, args: Any = None) -> Any:
        queries.append(sql)
        return await sent(cur, sql, args)

    now = time.time()
    batch = [item(e) for i in range(8) for e in (
        env(f"RT{i % 3}", "status", now - 60 + i, status="idle"),
        env(f"RT{i % 3}", "power", now - 60 + i, battery_level=50 + i, charge_state="idle"),
        env(f"RT{i % 3}", "event", now - 60 + i, event_id=f"e{i}", event_level="info"),
        env(f"RT{i % 3}", "task", now - 60 + i, task_id=f"t{i}", task_name="Lobby",
            task_status=2, task_time=int(now) - 60 + i))]
    await store.write_batch(batch[:1])  # migrated, connected
    monkeypatch.setattr(mysql._QuietCursor, "execute", spy)
    first = await store.write_batch(batch)
    again = await store.write_batch(batch)
    assert len(queries) == 2, [q[:60] for q in queries]
    assert first.logged == len(batch) - 1 and first.duplicate_ids == {batch[0][1].id}
    assert again.logged == 0 and again.duplicate_ids == {e.id for _, e in batch}


async def test_a_transaction_is_all_or_nothing_and_counts_each_statement(
        store: SqlStore) -> None:
    """The backend sends a transaction's statements together where it can (MySQL: one
    multi-statement round trip): each still gets its own count, a refused statement
    late in it leaves none of the earlier ones committed, and the next transaction on
    the pool works."""
    table = f"scratch_{uuid.uuid4().hex[:8]}"
    b, mark = store.backend, store.dialect.mark
    await b.transaction([(f"CREATE TABLE {table} (k VARCHAR(20) PRIMARY KEY)", None)])
    insert = f"INSERT INTO {table} (k) VALUES ({mark})"
    try:
        with pytest.raises(StoreError):
            await b.transaction([(insert, [("a",)]), (f"INSERT INTO {table} (k) VALUES ('b')",
                                                     None), (insert, [("a",)])])
        assert await b.fetch(f"SELECT k FROM {table}") == []
        odd = ["d'%s", 'e"\\', "f%%)", "g;\n--"]  # folded into one INSERT's text on MySQL
        counts = await b.transaction([(insert, [("a",)]), (insert, []),
                                      (insert, [("b",), ("c",)]),
                                      (f"UPDATE {table} SET k = k WHERE k > 'a'", None),
                                      (f"DELETE FROM {table} WHERE k = 'c'", None),
                                      (insert, [(k,) for k in odd]),
                                      (f"DELETE FROM {table} WHERE k = {mark}",
                                       [("d'%s",), ("nothing",), ("f%%)",)])])
        assert counts[:3] == [1, 0, 2] and counts[4:] == [1, 4, 2]
        assert {r["k"] for r in await b.fetch(f"SELECT k FROM {table}")} == {
            "a", "b", odd[1], odd[3]}
        # Reads at the start of a transaction (MySQL: in its one round trip) see what
        # was there before it, and only that.
        read, counts = await b.read_then_write(
            [(f"SELECT k FROM {table} WHERE k IN ({mark}, {mark})", ("a", "h")),
             (f"SELECT k AS x FROM {table} WHERE k = {mark}", ("b",))],
            [(insert, [("h",), ("i",)]), (f"DELETE FROM {table} WHERE k = 'a'", None)])
        assert read == [{"k": "a"}, {"x": "b"}] and counts == [2, 1]
    finally:
        await b.transaction([(f"DROP TABLE {table}", None)])
