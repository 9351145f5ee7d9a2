"""The replaced receiver's own tables (the seed DDL), as a migrating team has them.

Against MariaDB and SQLite, with a database_config.yaml naming them: messages land in
the seed tables in each column's own type (INT epoch seconds), out-of-order and
duplicate deliveries behave as on the product's own tables, the tables' definitions are
byte for byte what they were, and a key that does not fit is refused naming the target.
Two orgs reporting one sn are two robots.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.envelope import Envelope
from bridge.errors import StoreRejectedError
from callback_server.batcher import BatchWriter
from callback_server.store import SqlStore, Store, load_targets, open_store
from tests.support.dbutil import query
from tests.support.services import callback_server, edge_agent
from tests.test_pipeline import BROKER, HEADERS, event_body, prefix, status_body, wait_stored

#: The Flask receiver's tables, exactly (docs/storage.md, "Migrating from the Flask
#: receiver"): INT epoch seconds, VARCHAR(50) sn.
SEED_DDL = (
    """CREATE TABLE mnt_robots_management (
    robot_sn VARCHAR(50) PRIMARY KEY,
    status VARCHAR(50),
    battery_level INT,
    water_level INT,
    sewage_level INT,
    x DECIMAL(10,6),
    y DECIMAL(10,6),
    z DECIMAL(10,6),
    yaw DECIMAL(10,6),
    charge_state VARCHAR(50),
    last_updated INT
)""",
    """CREATE TABLE mnt_robot_events (
    robot_sn VARCHAR(50),
    event_id VARCHAR(100),
    event_level VARCHAR(20),
    event_type VARCHAR(100),
    event_detail TEXT,
    task_time INT,
    upload_time INT,
    PRIMARY KEY (robot_sn, event_id)
)""",
)
T0 = 1_700_000_000
TYPES = {"status": "notifyRobotStatus", "power": "notifyRobotPower", "pose": "notifyRobotPose",
         "event": "robotErrorWarning"}


def env(sn: str, channel: str, ts: float, *, org: str = "acme", **data: Any) -> Envelope:
    return Envelope(id=uuid.uuid4().hex, type=TYPES[channel], org=org, device=sn,
                    gateway="gw1", ts=ts, received_at=ts + 1, data=data, raw=dict(data),
                    channel=channel)


def item(e: Envelope) -> tuple[str, Envelope]:
    return (f"org/{e.org}/device/{e.device}/{e.channel}", e)


def database(url: str) -> str:
    return "main" if url.startswith("sqlite") else url.rsplit("/", 1)[1]


def seed(url: str, tmp_path: Path, extra: str = "") -> Path:
    """The seed tables and a database_config.yaml naming them, as the Flask receiver has
    them (docs/storage.md)."""
    for ddl in SEED_DDL:
        query(url, ddl)
    db = database(url)
    cfg = tmp_path / "database_config.yaml"
    cfg.write_text(
        f'databases:\n  - "{db}"\ntables:\n  robot_status:\n    - database: "{db}"\n'
        f'      table_name: "mnt_robots_management"\n      primary_keys: ["robot_sn"]\n'
        f'  robot_events:\n    - database: "{db}"\n      table_name: "mnt_robot_events"\n'
        f'      primary_keys: ["robot_sn", "event_id"]\n{extra}', encoding="utf-8")
    return cfg


def definitions(url: str) -> list[str]:
    """The tables' definitions as the database prints them."""
    if url.startswith("sqlite"):
        return [r["sql"] for r in query(
            url, "SELECT sql FROM sqlite_master WHERE name LIKE 'mnt_%' ORDER BY name")]
    return [query(url, f"SHOW CREATE TABLE {t}")[0]["Create Table"]
            for t in ("mnt_robot_events", "mnt_robots_management")]


def seed_rows(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    robots = query(url, "SELECT robot_sn, status, battery_level, x, y, charge_state,"
                        " last_updated FROM mnt_robots_management ORDER BY robot_sn")
    events = query(url, "SELECT robot_sn, event_id, event_level, task_time, upload_time"
                        " FROM mnt_robot_events ORDER BY robot_sn, event_id")
    for r in robots:
        r["x"] = None if r["x"] is None else float(r["x"])
        r["y"] = None if r["y"] is None else float(r["y"])
    return robots, events


def messages(sn: str, org: str = "acme") -> list[tuple[str, Envelope]]:
    return [item(e) for e in (
        env(sn, "status", T0 + 100, org=org, status="busy", battery_level=80),
        env(sn, "pose", T0 + 50, org=org, x=1.5, y=-2.25),
        env(sn, "power", T0 + 200, org=org, battery_level=70, charge_state="charging"),
        env(sn, "power", T0 + 20, org=org, battery_level=5, charge_state="low"),  # older
        env(sn, "event", T0 + 150, org=org, event_id="e1", event_level="error"),
    )]


async def test_seed_tables_get_epoch_integers_and_are_never_altered(
        db_url: str, tmp_path: Path) -> None:
    cfg = seed(db_url, tmp_path)
    before = definitions(db_url)
    async with open_store(db_url, targets=load_targets(cfg)) as store:
        report = await store.migrate()
        assert not [line for line in report if "ALTER TABLE" in line.upper()]
        assert sum("not owned; written only, never altered" in line for line in report) == 2
        assert any("last_updated int" in line.lower() and "epoch seconds" in line
                   for line in report)
        in_order = messages("R1")
        first = await store.write_batch(in_order)
        assert first.duplicate_ids == frozenset()
        # the same messages for R2 reversed, one per batch, each delivered twice
        for it in reversed(messages("R2")):
            await store.write_batch([it])
            again = await store.write_batch([it])
            assert again.duplicate_ids == {it[1].id} and again.logged == 0
        replay = await store.write_batch(in_order)
        assert replay.duplicate_ids == {e.id for _, e in in_order} and replay.events == 0
    robots, events = seed_rows(db_url)
    expected = {"status": "busy", "battery_level": 70, "x": 1.5, "y": -2.25,
                "charge_state": "charging", "last_updated": T0 + 200}
    assert robots == [{"robot_sn": "R1", **expected}, {"robot_sn": "R2", **expected}]
    assert all(type(r["last_updated"]) is int for r in robots)
    assert events == [{"robot_sn": sn, "event_id": "e1", "event_level": "error",
                       "task_time": T0 + 150, "upload_time": T0 + 151} for sn in ("R1", "R2")]
    if db_url.startswith("sqlite"):
        kinds = query(db_url, "SELECT DISTINCT typeof(last_updated) AS t"
                              " FROM mnt_robots_management")
        assert kinds == [{"t": "integer"}]
        kinds = query(db_url, "SELECT DISTINCT typeof(task_time) || typeof(upload_time) AS t"
                              " FROM mnt_robot_events")
        assert kinds == [{"t": "integerinteger"}]
    assert definitions(db_url) == before


async def test_rows_the_replaced_receiver_wrote_never_go_backwards(
        db_url: str, tmp_path: Path) -> None:
    cfg = seed(db_url, tmp_path)
    query(db_url, "INSERT INTO mnt_robots_management (robot_sn, status, battery_level,"
                  f" water_level, last_updated) VALUES ('OLD', 'idle', 77, 40, {T0 + 500})")
    async with open_store(db_url, targets=load_targets(cfg)) as store:
        await store.write_batch([item(env("OLD", "power", T0 + 400, battery_level=9))])
        assert seed_rows(db_url)[0][0]["battery_level"] == 77
        await store.write_batch([item(env("OLD", "status", T0 + 600, status="busy"))])
    row = query(db_url, "SELECT * FROM mnt_robots_management")[0]
    assert (row["status"], row["battery_level"], row["water_level"], row["last_updated"]) == \
        ("busy", 9, 40, T0 + 600)


async def test_an_sn_longer_than_the_seed_column_is_refused_naming_the_target(
        db_url: str, tmp_path: Path) -> None:
    cfg = seed(db_url, tmp_path)
    long_sn = "S" * 51
    async with open_store(db_url, targets=load_targets(cfg)) as store:
        with pytest.raises(StoreRejectedError,
                           match=r"target \S*mnt_robots_management: robot_sn 'S+' has 51 "
                                 r"characters, the column is (?i:varchar)\(50\)"):
            await store.write_batch(messages(long_sn))
        assert await store.get_robot(long_sn) is None  # nothing of the batch committed
        await store.write_batch(messages("S" * 50))  # one that fits
        assert await store.get_robot("S" * 50) is not None
    assert [r["robot_sn"] for r in seed_rows(db_url)[0]] == ["S" * 50]


async def test_with_several_targets_an_envelope_goes_to_all_or_none(
        db_url: str, tmp_path: Path) -> None:
    """The second events target takes event ids of 20 characters: a longer one is refused
    with that target's reason, and the first target does not get it either."""
    query(db_url, "CREATE TABLE narrow_events (robot_sn VARCHAR(50), event_id VARCHAR(20),"
                  " event_level VARCHAR(20), task_time INT, PRIMARY KEY (robot_sn, event_id))")
    cfg = seed(db_url, tmp_path, '    - table_name: "narrow_events"\n')
    async with open_store(db_url, targets=load_targets(cfg)) as store:
        long_id = env("R1", "event", T0, event_id="x" * 21, event_level="error")
        with pytest.raises(StoreRejectedError, match=r"target narrow_events: event_id"):
            await store.write_batch([item(long_id)])
        await store.write_batch([item(env("R1", "event", T0, event_id="ok", event_level="w"))])
    assert query(db_url, "SELECT event_id FROM mnt_robot_events") == [{"event_id": "ok"}]
    assert query(db_url, "SELECT event_id, task_time FROM narrow_events") == [
        {"event_id": "ok", "task_time": T0}]


async def _sees(store: SqlStore, org: str, sn: str) -> dict[str, Any]:
    robot = await store.get_robot(sn, [org])
    assert robot is not None and robot["org_id"] == org
    events, _ = await store.list_events(sn, limit=10, org=org)
    history, _ = await store.list_history(sn, since=0, limit=10, org=org)
    return {"status": robot["status"], "battery": robot["battery_level"],
            "events": [(e["event_id"], e["event_level"], e["org_id"]) for e in events],
            "history": sorted({h["org_id"] for h in history})}


async def test_two_orgs_with_one_sn_are_two_robots(
        db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mysql = db_url.startswith("mysql")
    cfg = seed(db_url, tmp_path)
    pairs = [("acme", "R1"), ("beta", "R1")]
    if mysql:  # MariaDB's default collation folds case; identifiers here must not
        pairs += [("acme", "caserobot"), ("beta", "CASEROBOT")]
    async with open_store(db_url, targets=load_targets(cfg)) as store:
        for n, (org, sn) in enumerate(pairs):
            batch = [item(env(sn, "status", T0 + 10 * n, org=org, status=f"{org}-s",
                              battery_level=10 + n)),
                     item(env(sn, "event", T0 + 10 * n, org=org, event_id="e1",
                              event_level=f"{org}-l"))]
            with caplog.at_level(logging.WARNING, "callback_server.store.sql"):
                result = await store.write_batch(batch)
            assert (result.logged, result.events) == (2, 1)  # beta's e1 is not a duplicate
        for n, (org, sn) in enumerate(pairs):
            assert await _sees(store, org, sn) == {
                "status": f"{org}-s", "battery": 10 + n, "events": [("e1", f"{org}-l", org)],
                "history": [org]}
        for org in ("acme", "beta"):
            listed, _ = await store.list_robots(limit=10, orgs=[org])
            assert {(r["org_id"], r["robot_sn"]) for r in listed} == \
                {p for p in pairs if p[0] == org}
        seen: list[tuple[str, str]] = []
        after: list[Any] | None = None
        while True:  # a page a robot: paging by (sn, org) skips neither org's R1
            page, after = await store.list_robots(limit=1, after=after)
            seen += [(r["org_id"], r["robot_sn"]) for r in page]
            if after is None:
                break
        assert sorted(seen) == sorted(pairs)
    # the single-tenant seed table: the first org to report an sn keeps it there
    robots, events = seed_rows(db_url)
    assert sorted((r["robot_sn"], r["status"]) for r in robots) == \
        [("R1", "acme-s"), *([("caserobot", "acme-s")] if mysql else [])]
    assert {e["event_level"] for e in events} == {"acme-l"}
    assert any("beta" in r.getMessage() and "not written" in r.getMessage()
               for r in caplog.records)


async def test_a_target_for_some_orgs_is_written_only_for_them(
        db_url: str, tmp_path: Path) -> None:
    for ddl in SEED_DDL:
        query(db_url, ddl)
    cfg = tmp_path / "database_config.yaml"
    cfg.write_text("tables:\n  robot_status:\n    - table_name: mnt_robots_management\n"
                   "      orgs: [beta]\n  robot_events:\n    - table_name: mnt_robot_events\n"
                   "      orgs: [beta]\n", encoding="utf-8")
    async with open_store(db_url, targets=load_targets(cfg)) as store:
        await store.write_batch(messages("R1", "acme") + messages("R1", "beta"))
        assert (await store.get_robot("R1", ["acme"])) is not None
    robots, events = seed_rows(db_url)
    assert [r["robot_sn"] for r in robots] == ["R1"] and len(events) == 1
    assert query(db_url, "SELECT org_id FROM target_robots") == [{"org_id": "beta"}] * 2


async def through_the_batcher(store: Store, batch: list[Any]) -> None:
    """``batch`` written as the service writes (bisection on StoreRejectedError)."""
    writer = BatchWriter(store, retry_min=0.01)
    task = asyncio.create_task(writer.run())
    try:
        await asyncio.wait_for(writer.write(batch), 30)
    finally:
        task.cancel()


async def test_the_batch_writer_dead_letters_exactly_the_refused_envelope(
        db_url: str, tmp_path: Path) -> None:
    """With today's batcher (bisection on StoreRejectedError): the one envelope whose sn
    does not fit VARCHAR(50) is dead-lettered with the target's reason, the rest stored."""
    cfg = seed(db_url, tmp_path)
    batch = messages("R1") + messages("R" * 51)[:1] + messages("R2")
    async with open_store(db_url, targets=load_targets(cfg)) as store:
        await through_the_batcher(store, batch)
    dead = query(db_url, "SELECT topic, reason FROM mqtt_dead_letters")
    assert len(dead) == 1 and dead[0]["topic"].endswith("R" * 51 + "/status")
    assert "target" in dead[0]["reason"] and "mnt_robots_management: robot_sn" in \
        dead[0]["reason"] and "has 51 characters" in dead[0]["reason"]
    assert [r["robot_sn"] for r in seed_rows(db_url)[0]] == ["R1", "R2"]
    assert query(db_url, "SELECT COUNT(*) AS n FROM mqtt_message_log")[0]["n"] == 10


async def test_a_value_cut_to_a_seed_column_is_said_once_per_column(
        db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A non-key text longer than the seed's VARCHAR is cut to it (documented), and the
    log says so once per target and column, naming both: never silently."""
    cfg = seed(db_url, tmp_path)
    caplog.set_level(logging.WARNING, logger="callback_server.store")
    async with open_store(db_url, targets=load_targets(cfg)) as store:
        for i in range(3):
            await store.write_batch([item(env("R1", "event", T0 + i, event_id=f"e{i}",
                                              event_level="error", event_type="T" * 150))])
        await store.write_batch([item(env("R1", "event", T0 + 9, event_id="e9",
                                          event_level="error", event_type="short"))])
    types = query(db_url, "SELECT event_type FROM mnt_robot_events ORDER BY event_id")
    assert [r["event_type"] for r in types] == ["T" * 100] * 3 + ["short"]
    said = [r.getMessage() for r in caplog.records if "event_type" in r.getMessage()]
    assert len(said) == 1, said
    assert "mnt_robot_events" in said[0] and "150 characters" in said[0] and \
        "100" in said[0], said[0]
    assert caplog.records[0].levelno == logging.WARNING


async def test_a_number_out_of_a_seed_columns_range_is_refused_naming_target_and_column(
        db_url: str, tmp_path: Path) -> None:
    """x = 123456.5 cannot be the seed's DECIMAL(10,6) (at most 9999.999999): the envelope
    is dead-lettered with a reason naming the target and the column, on either database,
    and the others of the batch are stored."""
    cfg = seed(db_url, tmp_path)
    far = env("R1", "pose", T0 + 300, x=123456.5, y=1.0)
    batch = [*messages("R1"), item(far), *messages("R2")]
    async with open_store(db_url, targets=load_targets(cfg)) as store:
        with pytest.raises(StoreRejectedError,
                           match=r"target \S*mnt_robots_management: x 123456\.5 does not fit"
                                 r" the column, (?i:decimal)\(10,6\)"):
            await store.write_batch([item(far)])
        await through_the_batcher(store, batch)
    dead = query(db_url, "SELECT topic, reason FROM mqtt_dead_letters")
    assert len(dead) == 1 and dead[0]["topic"].endswith("R1/pose"), dead
    assert "mnt_robots_management: x 123456.5" in dead[0]["reason"], dead
    assert [(r["robot_sn"], r["x"]) for r in seed_rows(db_url)[0]] == [("R1", 1.5),
                                                                       ("R2", 1.5)]


@pytest.mark.integration
def test_webhooks_through_edge_and_broker_land_in_the_seed_tables(
        db_url: str, tmp_path: Path) -> None:
    """Two orgs' gateways report the same sn through the real pipeline: the seed table
    holds the first org's robot in epoch integers, out-of-order and duplicate deliveries
    change nothing, its definition is unchanged, and the API shows each org its robot."""
    cfg = seed(db_url, tmp_path)
    before = definitions(db_url)
    p = prefix()
    ms = 1_700_000_000_000
    acme = [status_body("R1", i, ms + i * 1000) for i in range(6)] + [event_body("R1", 1)]
    beta = [status_body("R1", 50 + i, ms + i * 1000) for i in range(2)] + [event_body("R1", 1)]
    shuffled = acme[::-1] + acme[:3]  # newest first, then three again
    with callback_server(tmp_path, BROKER, db_url, TOPIC_PREFIX=p,
                         DATABASE_CONFIG=str(cfg)) as server, \
            edge_agent(tmp_path, BROKER, org="acme", TOPIC_PREFIX=p) as a, \
            edge_agent(tmp_path, BROKER, org="beta", gateway="gw2", TOPIC_PREFIX=p) as b:
        # "First" is first at the cloud: beta's gateway posts once acme's robot is stored.
        for url, bodies, total in ((a.url, shuffled, len(acme)),
                                   (b.url, beta, len(acme) + len(beta))):
            with httpx.Client(base_url=url, headers=HEADERS, timeout=10) as c:
                for body in bodies:
                    assert c.post("/api/pudu/webhook", json=body).status_code == 200
            wait_stored(server, total)  # the edge keeps a redelivery once
        views = {org: httpx.get(f"{server.url}/robots?org={org}", headers=server.auth).json()
                 for org in ("acme", "beta")}
    robots, events = seed_rows(db_url)
    assert [(r["robot_sn"], r["battery_level"], r["last_updated"]) for r in robots] == \
        [("R1", 5, 1_700_000_005)]  # acme's newest; beta's R1 is not merged into it
    assert [(e["robot_sn"], e["event_id"], e["task_time"]) for e in events] == \
        [("R1", "e1", 1_700_000_001)]
    assert definitions(db_url) == before
    assert [(r["org_id"], r["battery_level"]) for r in views["acme"]["items"]] == [("acme", 5)]
    assert [(r["org_id"], r["battery_level"]) for r in views["beta"]["items"]] == [("beta", 51)]


def test_migrate_says_what_it_owns_and_what_it_only_writes(tmp_path: Path) -> None:
    """``callback-server migrate --plan`` changes nothing and names, per target, whether it
    is owned; ``migrate`` then creates only the product's own tables."""
    from tests.test_cli import cli

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    cfg = seed(url, tmp_path)
    env = {"DATABASE_URL": url, "DATABASE_CONFIG": str(cfg)}
    plan = cli("callback_server", "migrate", "--plan", env=env)
    assert plan.returncode == 0, plan.stderr
    assert "would create table robot_state" in plan.stdout
    assert "target main.mnt_robots_management (robot_status): not owned; written only, " \
           "never altered" in plan.stdout
    assert "only writes: main.mnt_robots_management, main.mnt_robot_events" in plan.stdout
    assert "ALTER TABLE" not in plan.stdout.upper()
    names = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    assert [r["name"] for r in query(url, names)] == ["mnt_robot_events",
                                                      "mnt_robots_management"]
    before = definitions(url)
    done = cli("callback_server", "migrate", env=env)
    assert done.returncode == 0 and "created table robot_state" in done.stdout
    assert definitions(url) == before
    owned = query(url, "SELECT table_name FROM store_tables ORDER BY table_name")
    assert "robot_state" in {r["table_name"] for r in owned}
    assert not {"mnt_robots_management", "main.mnt_robots_management"} & \
        {r["table_name"] for r in owned}
