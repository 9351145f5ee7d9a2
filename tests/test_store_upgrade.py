"""An upgrade from version 1's schema, with data: ``migrate`` re-keys the own tables by
org, copies the bookkeeping version 1 kept on the target tables into ``robot_state`` /
``robot_events``, and every robot, event, history point, task and alert is still seen by
its org afterwards, with reads that no longer touch the targets' added columns (shown
by dropping them with ``--drop-added-columns`` and reading again)."""

from __future__ import annotations

from pathlib import Path

from bridge.envelope import Envelope
from callback_server.alerts.store import AlertStore
from callback_server.store import SqlStore, open_store
from tests.support.dbutil import query

SAMPLES = Path(__file__).parent / "samples"
T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC
ADDED = ["battery_ts", "charge_ts", "charging_ts", "gateway_id", "is_charging", "last_ts",
         "map_name", "map_ts", "move_state", "move_ts", "org_id", "pose_ts", "status_ts"]
SEED_ROBOT_COLUMNS = ["robot_sn", "status", "battery_level", "water_level", "sewage_level",
                      "x", "y", "z", "yaw", "charge_state", "last_updated"]


def version_1(url: str) -> None:
    """Version 1's tables (their DDL copied from main) holding two orgs' robots."""
    kind = "sqlite" if url.startswith("sqlite") else "mysql"
    for line in (SAMPLES / f"store-v1.{kind}.sql").read_text().splitlines():
        if line and not line.startswith("--"):
            query(url, line)
    marks = ", ".join([f"{T0}.0"] * 8)
    for sn, org, status in (("R1", "acme", "busy"), ("R2", "beta", "idle")):
        query(url, "INSERT INTO mnt_robots_management (robot_sn, org_id, gateway_id, status,"
                   " battery_level, move_state, last_updated, status_ts, battery_ts, charge_ts,"
                   " charging_ts, move_ts, pose_ts, map_ts, last_ts) VALUES"
                   f" (?, ?, 'gw-{org}', ?, 60, 'moving', '2023-11-14 22:13:20', {marks})",
              (sn, org, status))
        query(url, "INSERT INTO mnt_robot_events (robot_sn, event_id, event_level, org_id,"
                   " task_time, upload_time, ts) VALUES (?, 'e1', ?, ?, '2023-11-14 22:13:20',"
                   f" '2023-11-14 22:13:21', {T0})", (sn, f"{org}-level", org))
        query(url, "INSERT INTO robot_history (robot_sn, ts, recorded_at, org_id, status)"
                   f" VALUES (?, {T0}, '2023-11-14 22:13:20', ?, ?)", (sn, org, status))
        query(url, "INSERT INTO robot_tasks (robot_sn, task_key, org_id, task_id, ts) VALUES"
                   f" (?, 't1', ?, 't1', {T0})", (sn, org))
        query(url, "INSERT INTO alert_watch (robot_sn, org_id, seen_at) VALUES"
                   f" (?, ?, {T0})", (sn, org))
        query(url, "INSERT INTO mqtt_message_log (id, org_id, device_id, channel, ts) VALUES"
                   f" (?, ?, ?, 'status', {T0})", (f"msg-{sn}", org, sn))
    query(url, "INSERT INTO device_commands (message_id, org_id, device_id, command) VALUES"
               " ('m1', 'acme', 'gw-acme', 'ping')")
    query(url, "INSERT INTO alerts (id, rule, org_id, subject_type, subject_id, severity,"
               f" state, opened_at, updated_at) VALUES ('a1', 'robot_fault', 'acme', 'robot',"
               f" 'R1', 'critical', 'open', {T0}, {T0})")


def columns(url: str, table: str) -> list[str]:
    if url.startswith("sqlite"):
        return [r["name"] for r in query(url, f"PRAGMA table_info({table})")]
    return [r["Field"] for r in query(url, f"SHOW COLUMNS FROM {table}")]


async def each_org_sees_its_own(store: SqlStore) -> None:
    for sn, org, other, status in (("R1", "acme", "beta", "busy"),
                                   ("R2", "beta", "acme", "idle")):
        robot = await store.get_robot(sn, [org])
        assert robot is not None
        assert (robot["org_id"], robot["gateway_id"], robot["status"], robot["move_state"]) \
            == (org, f"gw-{org}", status, "moving")
        assert await store.get_robot(sn, [other]) is None
        events, _ = await store.list_events(sn, limit=5, org=org)
        assert [(e["event_id"], e["event_level"]) for e in events] == [("e1", f"{org}-level")]
        history, _ = await store.list_history(sn, since=0, limit=5, org=org)
        assert [h["status"] for h in history] == [status]
        assert [t["task_id"] for t in await store.list_tasks(sn, limit=5, org=org)] == ["t1"]
        assert await store.list_tasks(sn, limit=5, org=other) == []
    alert = await AlertStore(store).get("a1")
    assert alert is not None and alert.org == "acme"
    # (keyed by (org, sn) since issue 24)
    facts = await AlertStore(store).facts({("acme", "R1"), ("beta", "R2")})
    assert set(facts) == {("acme", "R1"), ("beta", "R2")}
    assert all(f["watched"] and f["seen_at"] is not None for f in facts.values())


async def test_upgrade_from_version_1_with_data(db_url: str) -> None:
    version_1(db_url)
    async with open_store(db_url) as store:
        plan = await store.migrate(apply=False)
        assert "would copy the bookkeeping of mnt_robots_management into robot_state" in plan
        assert "would re-key table robot_history by (org_id, robot_sn, ts), keeping its rows" \
            in plan
        assert columns(db_url, "robot_history")[0] == "robot_sn"  # planning changed nothing
        report = await store.migrate()
        assert "re-keyed table robot_history by (org_id, robot_sn, ts), rows kept" in report
        added = [line for line in report if "columns an earlier version" in line]
        assert len(added) == 2 and ", ".join(ADDED) in added[0]
        assert "--drop-added-columns" in added[0]
        await each_org_sees_its_own(store)
        # a redelivered envelope of version 1's log is still a duplicate
        again = Envelope(id="msg-R1", type="notifyRobotStatus", org="acme", device="R1",
                         gateway="gw-acme", ts=T0 - 5, received_at=T0, data={"status": "x"},
                         raw={}, channel="status")
        assert (await store.write_batch([again])).duplicate_ids == {"msg-R1"}
    async with open_store(db_url) as store:
        second = await store.migrate()  # idempotent: nothing copied or re-keyed again
        assert not [line for line in second if "copy" in line or "re-key" in line]
        await each_org_sees_its_own(store)
        dropped = await store.migrate(drop_added=True)
        assert any(line.startswith("drop columns battery_ts") for line in dropped)
        assert columns(db_url, "mnt_robots_management") == SEED_ROBOT_COLUMNS
        await each_org_sees_its_own(store)  # reads never used the added columns
    async with open_store(db_url) as store:
        report = await store.migrate()
        assert "target mnt_robots_management (robot_status): not owned; written only, " \
               "never altered" in report
        assert columns(db_url, "mnt_robots_management") == SEED_ROBOT_COLUMNS
        newer = Envelope(id="n1", type="notifyRobotStatus", org="acme", device="R1",
                         gateway="gw-acme", ts=T0 + 60, received_at=T0 + 61,
                         data={"status": "idle"}, raw={}, channel="status")
        await store.write_batch([newer])
    row = query(db_url, "SELECT status, last_updated FROM mnt_robots_management"
                        " WHERE robot_sn = 'R1'")[0]
    assert row["status"] == "idle" and str(row["last_updated"]).startswith("2023-11-14 22:14:20")
