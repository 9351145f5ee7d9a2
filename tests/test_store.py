"""The store against real MariaDB and SQLite: idempotent, order-independent writes."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from bridge.envelope import Envelope
from bridge.errors import StoreError
from callback_server.store import SqlStore, Table, load_targets, open_store
from tests.dbutil import query, scratch_mysql_database

pytestmark = pytest.mark.integration


@pytest.fixture(params=["mysql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with scratch_mysql_database() as url:
            yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlStore]:
    async with open_store(db_url) as s:
        await s.migrate()
        yield s


def env(sn: str, channel: str, ts: float, ctype: str = "", **data: Any) -> Envelope:
    ctype = ctype or {"status": "notifyRobotStatus", "power": "notifyRobotPower",
                      "pose": "notifyRobotPose", "event": "robotErrorWarning",
                      "move": "notifyRobotMoveState"}[channel]
    return Envelope(id=uuid.uuid4().hex, type=ctype, org="acme", device=sn, gateway="gw",
                    ts=ts, received_at=ts + 1, data=data, raw=dict(data), channel=channel)


def item(e: Envelope) -> tuple[str, Envelope]:
    return (f"org/acme/device/{e.device}/{e.channel}", e)


async def test_migrate_is_idempotent_and_state_upserts(store: SqlStore, db_url: str) -> None:
    await store.migrate()
    await store.write_batch([item(env("A", "status", 10, status="idle", battery_level=50))])
    await store.write_batch([item(env("A", "power", 11, battery_level=49,
                                      charge_state="charging"))])
    robot = await store.get_robot("A")
    assert robot is not None
    assert (robot["status"], robot["battery_level"], robot["charge_state"]) == (
        "idle", 49, "charging")
    assert robot["last_updated"].startswith("1970-01-01 00:00:11")


async def test_older_ts_never_overwrites_newer(store: SqlStore) -> None:
    await store.write_batch([item(env("A", "status", 20, status="busy"))])
    await store.write_batch([item(env("A", "status", 10, status="offline"))])  # late
    # within one batch too, whatever the order
    await store.write_batch([item(env("B", "power", 30, battery_level=30)),
                             item(env("B", "power", 20, battery_level=20))])
    assert (await store.get_robot("A"))["status"] == "busy"  # type: ignore[index]
    assert (await store.get_robot("B"))["battery_level"] == 30  # type: ignore[index]


async def test_pose_does_not_wipe_status_and_notice_feeds_state(store: SqlStore) -> None:
    await store.write_batch([item(env("C", "status", 10, status="idle", battery_level=80))])
    await store.write_batch([item(env("C", "pose", 11, x=1.5, y=2.5, yaw=90.0))])
    await store.write_batch([item(env("C", "event", 12, ctype="robotErrorNotice",
                                      event_id="e1", event_level="info", battery_level=58,
                                      x=-1.0, y=4.0, yaw=1.3))])
    robot = await store.get_robot("C")
    assert robot is not None
    assert robot["status"] == "idle"
    assert robot["battery_level"] == 58 and robot["x"] == -1.0 and robot["y"] == 4.0
    events = await store.get_events("C")
    assert [e["event_id"] for e in events] == ["e1"]


async def test_redelivery_inserts_nothing_twice(store: SqlStore, db_url: str) -> None:
    batch = [item(env("D", "event", 5, event_id=f"e{i}", event_level="high")) for i in range(5)]
    await store.write_batch(batch)
    await store.write_batch(batch)  # a QoS 1 redelivery of the whole batch
    await store.write_batch(batch[2:] + batch[:2])
    assert len(query(db_url, "SELECT * FROM mnt_robot_events")) == 5
    assert len(query(db_url, "SELECT * FROM mqtt_message_log")) == 5


async def test_shuffled_replay_equals_in_order_delivery(tmp_path: Path, db_url: str) -> None:
    rng = random.Random(3)
    items = []
    for i in range(400):
        sn = f"R{i % 7}"
        kind = rng.choice(["status", "power", "pose", "event", "move"])
        data: dict[str, Any] = {
            "status": {"status": rng.choice(["idle", "busy"]), "battery_level": i % 100},
            "power": {"battery_level": i % 100, "charge_state": rng.choice(["idle", "charging"])},
            "pose": {"x": float(i), "y": float(-i), "yaw": 1.0},
            "event": {"event_id": f"e{i}", "event_level": "info", "battery_level": i % 100},
            "move": {"move_state": rng.choice(["moving", "idle"])},
        }[kind]
        items.append(item(env(sn, kind, 1000 + i, **data)))
    in_order = f"sqlite:///{tmp_path / 'in-order.db'}"
    async with open_store(in_order) as s:
        for i in range(0, len(items), 1):
            await s.write_batch(items[i:i + 1])
        expected = await s.get_robots()
    shuffled = items[:]
    rng.shuffle(shuffled)
    async with open_store(db_url) as s:
        for i in range(0, len(shuffled), 37):
            await s.write_batch(shuffled[i:i + 37])
        await s.write_batch(shuffled[:100])  # and a replay
        got = await s.get_robots()
    strip = ("last_updated",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in got] == [
        {k: v for k, v in r.items() if k not in strip} for r in expected]


async def test_every_configured_target_is_written(tmp_path: Path, db_url: str) -> None:
    extra = f"t_{uuid.uuid4().hex[:8]}" if db_url.startswith("mysql") else "analytics"
    cfg = tmp_path / "database_config.yaml"
    cfg.write_text(f"""
databases: [main, {extra}]
tables:
  robot_status:
    - {{table_name: mnt_robots_management, primary_keys: [robot_sn]}}
    - {{database: {extra}, table_name: robot_state_copy, primary_keys: [robot_sn]}}
  robot_events:
    - {{table_name: mnt_robot_events, primary_keys: [robot_sn, event_id]}}
    - {{database: {extra}, table_name: mnt_robot_events, primary_keys: [robot_sn, event_id]}}
""")
    targets = load_targets(cfg)
    assert targets.robot_status[1] == Table(extra, "robot_state_copy")
    try:
        async with open_store(db_url, targets=targets) as s:
            await s.write_batch([item(env("E", "status", 1, status="idle")),
                                 item(env("E", "event", 2, event_id="x", event_level="info"))])
            for table in ("robot_state_copy", "mnt_robot_events"):
                rows = await s.backend.fetch(
                    f"SELECT robot_sn FROM {s.dialect.quote(extra + '.' + table)}")
                assert [r["robot_sn"] for r in rows] == ["E"]
            assert (await s.get_robot("E")) is not None
    finally:
        if db_url.startswith("mysql"):
            with pymysql.connect(host="127.0.0.1", user="root") as conn:
                conn.cursor().execute(f"DROP DATABASE IF EXISTS `{extra}`")


async def test_dead_letters_and_commands_are_kept(store: SqlStore, db_url: str) -> None:
    await store.dead_letter("org/acme/device/x/status", b"\xffnot json", "envelope is not JSON")
    rows = query(db_url, "SELECT topic, reason FROM mqtt_dead_letters")
    assert rows == [{"topic": "org/acme/device/x/status", "reason": "envelope is not JSON"}]


async def test_existing_legacy_table_gains_the_extra_columns(db_url: str) -> None:
    legacy = ("CREATE TABLE mnt_robots_management (robot_sn VARCHAR(64) PRIMARY KEY,"
              " status VARCHAR(32), battery_level INT, water_level INT, sewage_level INT,"
              " x DOUBLE, y DOUBLE, z DOUBLE, yaw DOUBLE, charge_state VARCHAR(64),"
              " last_updated DATETIME)")
    query(db_url, legacy)
    query(db_url, "INSERT INTO mnt_robots_management (robot_sn, status, water_level)"
                  " VALUES ('OLD', 'idle', 40)")
    async with open_store(db_url) as s:
        await s.write_batch([item(env("OLD", "power", 5, battery_level=9))])
        robot = await s.get_robot("OLD")
    assert robot is not None
    assert (robot["status"], robot["water_level"], robot["battery_level"]) == ("idle", 40, 9)


async def test_unreachable_mysql_is_a_store_error_then_recovers_elsewhere() -> None:
    start = time.monotonic()
    async with open_store("mysql://root:@127.0.0.1:1/test") as s:
        assert await s.ping() is False
        with pytest.raises(StoreError, match=r"127\.0\.0\.1:1/"):
            await s.write_batch([item(env("A", "status", 1, status="idle"))])
    assert time.monotonic() - start < 10
