"""Webhook -> edge agent -> Mosquitto -> callback server -> database rows (real processes).

Every test runs against MariaDB and against SQLite; each uses its own topic prefix so
tests sharing the broker on 1883 never see each other's traffic.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.dbutil import query
from tests.support.mariadb_proc import MariadbProcess
from tests.support.services import ServiceProcess, callback_server, edge_agent
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

BROKER = "mqtt://127.0.0.1:1883"
SAMPLES = Path(__file__).parent / "samples" / "pudu"
HEADERS = {"CallbackCode": "test-code"}


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def wait_stored(server: ServiceProcess, count: int, timeout: float = 30.0) -> dict[str, Any]:
    """Poll the server's health until ``count`` messages are committed (stored, or found
    already stored: a redelivery)."""
    return eventually(server.health, within=timeout, what=f"{count} messages committed",
                      accept=lambda h: int(h["stored"]) + int(h["duplicates"]) >= count)


def status_body(sn: str, i: int, ts_ms: int) -> dict[str, Any]:
    return {"callback_type": "notifyRobotStatus",
            "data": {"sn": sn, "battery": i % 101, "run_state": "BUSY" if i % 2 else "IDLE",
                     "timestamp": ts_ms // 1000, "notify_timestamp": ts_ms}}


def event_body(sn: str, i: int) -> dict[str, Any]:
    return {"callback_type": "robotErrorWarning",
            "data": {"sn": sn, "error_level": "Error", "error_type": "Lost",
                     "error_detail": f"d{i}", "error_id": f"e{i}", "timestamp": 1700000000 + i}}


def post(url: str, bodies: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=url, headers=HEADERS, timeout=10) as c:
        for body in bodies:
            r = c.post("/api/pudu/webhook", json=body)
            assert r.status_code == 200, r.text


def robots(db: str) -> dict[str, dict[str, Any]]:
    return {r["robot_sn"]: r for r in query(db, "SELECT * FROM mnt_robots_management")}


def test_every_sample_reaches_the_tables(tmp_path: Path, db_url: str) -> None:
    p = prefix()
    files = sorted(SAMPLES.rglob("*.json"))
    with callback_server(tmp_path, BROKER, db_url, TOPIC_PREFIX=p) as server, \
            edge_agent(tmp_path, BROKER, org="acme", TOPIC_PREFIX=p) as agent:
        post(agent.url, [json.loads(f.read_text()) for f in files])
        wait_stored(server, len(files))
        api = httpx.get(f"{server.url}/robots/SN-PD202405000001", headers=server.auth).json()
    state = robots(db_url)
    assert state["811064412050012"]["status"] == "online"
    assert state["811064412050012"]["battery_level"] == 75
    assert float(state["811064412050012"]["x"]) == pytest.approx(15.5)
    assert state["SN-PD202405000001"]["battery_level"] == 85  # from notifyRobotStatus
    assert state["SN-PD202405000001"]["status"] == "idle"
    notice = state["826004C17060045"]  # cleaning robot: state from robotErrorNotice
    assert notice["battery_level"] == 58
    assert float(notice["y"]) == pytest.approx(4.99104)
    assert state["TS1732946965085"]["battery_level"] == 99
    events = query(db_url, "SELECT * FROM mnt_robot_events ORDER BY robot_sn")
    assert {(e["robot_sn"], e["event_level"]) for e in events} == {
        ("811064412050012", "warning"), ("826004C17060045", "info")}
    assert any(e["event_id"] == "vir_1726794796" for e in events)
    assert api["battery_level"] == 85 and api["robot_sn"] == "SN-PD202405000001"


def _expected(bodies: list[dict[str, Any]]) -> tuple[dict[str, int], set[str]]:
    """What a single in-order delivery leaves: newest battery per robot, all event ids."""
    newest: dict[str, tuple[int, int]] = {}
    events = set()
    for b in bodies:
        d = b["data"]
        if b["callback_type"] == "notifyRobotStatus":
            if d["notify_timestamp"] >= newest.get(d["sn"], (-1, 0))[0]:
                newest[d["sn"]] = (d["notify_timestamp"], d["battery"])
        else:
            events.add(d["error_id"])
    return {sn: v[1] for sn, v in newest.items()}, events


def _workload(n: int, robots_: int = 4) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    for i in range(n):
        sn = f"R{i % robots_}"
        bodies.append(status_body(sn, i, 1_700_000_000_000 + i * 1000))
        if i % 5 == 0:
            bodies.append(event_body(sn, i))
    return bodies


def _check_tables(db: str, bodies: list[dict[str, Any]]) -> None:
    batteries, event_ids = _expected(bodies)
    state = robots(db)
    assert {sn: r["battery_level"] for sn, r in state.items()} == batteries
    rows = query(db, "SELECT event_id FROM mnt_robot_events")
    assert sorted(r["event_id"] for r in rows) == sorted(event_ids)  # each exactly once


def test_out_of_order_and_duplicate_delivery_equal_in_order_result(
    tmp_path: Path, db_url: str
) -> None:
    p = prefix()
    bodies = _workload(120)
    shuffled = bodies[:]
    random.Random(7).shuffle(shuffled)
    with callback_server(tmp_path, BROKER, db_url, TOPIC_PREFIX=p) as server, \
            edge_agent(tmp_path, BROKER, org="acme", TOPIC_PREFIX=p) as agent:
        post(agent.url, shuffled)
        health = wait_stored(server, len(bodies))
        # replay what the broker carried (QoS 1 redelivery / a replay after an outage)
        replayed = _replay_envelopes(p, agent, server,
                                     int(health["stored"]) + int(health["duplicates"]))
        assert replayed == len(bodies)
    _check_tables(db_url, bodies)
    logged = query(db_url, "SELECT COUNT(*) AS n FROM mqtt_message_log")[0]["n"]
    assert logged == len(bodies)


def _replay_envelopes(p: str, agent: ServiceProcess, server: ServiceProcess,
                      stored: int) -> int:
    """Re-publish every envelope the database logged, then wait for it to be consumed."""
    del agent
    rows = query(_db_of(server), "SELECT topic, payload FROM mqtt_message_log")
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        infos = [client.publish(r["topic"], r["payload"], qos=1) for r in rows]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    wait_stored(server, stored + len(rows))
    return len(rows)


def _db_of(server: ServiceProcess) -> str:
    return server.env["DATABASE_URL"]


def test_database_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    p = prefix()
    bodies = _workload(300)
    with MariadbProcess(tmp_path / "db") as db, \
            callback_server(tmp_path, BROKER, db.url, TOPIC_PREFIX=p) as server, \
            edge_agent(tmp_path, BROKER, org="acme", TOPIC_PREFIX=p) as agent:
        poster = threading.Thread(target=post, args=(agent.url, bodies))
        poster.start()
        wait_stored(server, 50)
        db.stop()
        poster.join()  # the edge keeps answering 200 while the database is down
        eventually(server.health, accept=lambda h: h["status"] == "degraded", within=20,
                   what="the server degraded")
        db.start()
        wait_stored(server, len(bodies))
        _check_tables(db.url, bodies)


def test_callback_server_killed_mid_batch_loses_nothing(tmp_path: Path, db_url: str) -> None:
    p = prefix()
    bodies = _workload(400)
    client_id = f"cs-kill-{p}"
    with edge_agent(tmp_path, BROKER, org="acme", TOPIC_PREFIX=p) as agent:
        first = callback_server(tmp_path, BROKER, db_url, TOPIC_PREFIX=p,
                                MQTT_CLIENT_ID=client_id).start()
        poster = threading.Thread(target=post, args=(agent.url, bodies))
        poster.start()
        try:
            wait_stored(first, 40)
        finally:
            first.kill()
        poster.join()
        # the same client id finds its persistent session: unacked messages come back
        with callback_server(tmp_path, BROKER, db_url, TOPIC_PREFIX=p,
                             MQTT_CLIENT_ID=client_id) as second:
            eventually(lambda: query(db_url, "SELECT COUNT(*) AS n FROM mqtt_message_log")[0]["n"],
                       accept=lambda n: n >= len(bodies), within=30,
                       what=f"{len(bodies)} messages in the log")
            health = second.health()
            assert health["stored"] + health["duplicates"] > 0
    _check_tables(db_url, bodies)


def test_two_servers_share_the_stream_and_store_each_message_once(
    tmp_path: Path, db_url: str
) -> None:
    p = prefix()
    bodies = _workload(300)
    group = f"g{p}"
    with callback_server(tmp_path, BROKER, db_url, name="a", TOPIC_PREFIX=p,
                         SHARE_GROUP=group) as a, \
            callback_server(tmp_path, BROKER, db_url, name="b", TOPIC_PREFIX=p,
                            SHARE_GROUP=group) as b, \
            edge_agent(tmp_path, BROKER, org="acme", TOPIC_PREFIX=p) as agent:
        post(agent.url, bodies)
        sa, sb = eventually(lambda: (a.health()["stored"], b.health()["stored"]), within=30,
                            accept=lambda ab: sum(ab) >= len(bodies),
                            what=f"{len(bodies)} stored by the two replicas")
        assert sa + sb == len(bodies)  # each message delivered to exactly one replica
        assert sa > 0 and sb > 0
    _check_tables(db_url, bodies)
