"""The callback server on its own: IoT Rule ingest, dead letters, Nagle, DB down at start."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.envelope import Envelope
from tests.support.dbutil import query
from tests.support.mariadb_proc import MariadbProcess
from tests.support.procs import free_port
from tests.support.services import callback_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
TOKEN = {"X-Callback-Token": "rule-token"}


def envelope(org: str, sn: str, i: int) -> dict[str, Any]:
    env = Envelope(id=f"m{i}-{sn}", type="notifyRobotPower", org=org, device=sn, gateway="gw",
                   ts=1700000000 + i, received_at=1700000001 + i, data={"battery_level": i},
                   raw={"power": i}, channel="power")
    return json.loads(env.to_json())  # type: ignore[no-any-return]


def test_iot_rule_ingest_is_authenticated_and_idempotent(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    p = f"t{uuid.uuid4().hex[:8]}"
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p, CALLBACK_TOKEN="rule-token") as cs:
        url = cs.url + "/callback/messages"
        one = envelope("acme", "R1", 5)
        topic = f"{p}/org/acme/device/R1/power"
        assert httpx.post(url, json=one).status_code == 401
        assert httpx.post(url, json=one, headers={"X-Callback-Token": "nope"}).status_code == 401
        for _ in range(3):  # the rule's retries after a timeout
            r = httpx.post(url, json=one, headers={**TOKEN, "X-Mqtt-Topic": topic})
            assert r.status_code == 200, r.text
        # a batch with the topic added by the rule's SQL (topic() AS topic)
        batch = [{**envelope("acme", "R1", i), "topic": topic} for i in range(6, 9)]
        assert httpx.post(url, json=batch, headers=TOKEN).status_code == 200
        bad = httpx.post(url, json={"id": "x", "type": "t"}, headers=TOKEN).json()
        assert bad["dead_lettered"] == 1 and "lacks" in bad["results"][0]["reason"]
        wrong_topic = httpx.post(url, json=one, headers={**TOKEN,
                                 "X-Mqtt-Topic": f"{p}/org/other/device/R1/power"}).json()
        assert wrong_topic["results"][0]["reason"].startswith("inconsistent with its topic")
        robot = httpx.get(cs.url + "/robots/R1", headers=cs.auth).json()
        events = httpx.get(cs.url + "/robots/R1/events", headers=cs.auth).json()["items"]
    assert robot["battery_level"] == 8
    assert events == []
    log = query(db, "SELECT id FROM mqtt_message_log ORDER BY id")
    assert [r["id"] for r in log] == ["m5-R1", "m6-R1", "m7-R1", "m8-R1"]
    dead = query(db, "SELECT reason FROM mqtt_dead_letters")
    assert len(dead) == 2 and any("lacks" in d["reason"] for d in dead)


def test_malformed_mqtt_messages_are_dead_lettered_not_looped(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    p = f"t{uuid.uuid4().hex[:8]}"
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p) as cs:
        client = mqtt.Client(CallbackAPIVersion.VERSION2)
        client.connect("127.0.0.1", 1883)
        client.loop_start()
        for payload in (b"not json", b'{"id": "x"}', b"[]"):
            client.publish(f"{p}/org/acme/device/R1/status", payload, qos=1).wait_for_publish()
        good = json.dumps(envelope("acme", "R1", 1)).encode()
        client.publish(f"{p}/org/acme/device/R1/power", good, qos=1).wait_for_publish()
        client.disconnect()
        client.loop_stop()
        cs.wait_health("stored", 1)
        cs.wait_health("dead_lettered", 3)
        assert cs.proc is not None and cs.proc.poll() is None  # still running
        metrics = httpx.get(cs.url + "/metrics", headers=cs.auth).text
    assert "callback_dead_letters_total 3.0" in metrics
    reasons = [r["reason"] for r in query(db, "SELECT reason FROM mqtt_dead_letters")]
    assert any("not JSON" in r for r in reasons) and any("object" in r for r in reasons)


def test_accepted_sockets_have_nagle_disabled(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    with callback_server(tmp_path, BROKER, db) as cs:
        health = cs.health()  # this very connection was checked with getsockopt on accept
    assert health["tcp_nodelay_verified"] is True
    stats = health["tcp_nodelay"]
    assert stats["accepted"] >= 1 and stats["failed"] == 0
    assert stats["already_set"] + stats["set_by_us"] == stats["accepted"]


def test_database_down_at_start_degrades_then_catches_up(tmp_path: Path) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    db = MariadbProcess(tmp_path / "db")
    with callback_server(tmp_path, BROKER, db.url, TOPIC_PREFIX=p) as cs:
        assert cs.health()["status"] == "degraded"
        client = mqtt.Client(CallbackAPIVersion.VERSION2)
        client.connect("127.0.0.1", 1883)
        client.loop_start()
        for i in range(20):
            payload = json.dumps(envelope("acme", "R2", i)).encode()
            client.publish(f"{p}/org/acme/device/R2/power", payload, qos=1).wait_for_publish()
        client.disconnect()
        client.loop_stop()
        cs.wait_health("pending", 20)  # held, not acked, while the database is away
        with db:
            cs.wait_health("stored", 20)
            cs.wait_health("status", "healthy")
            assert query(db.url, "SELECT battery_level FROM mnt_robots_management") == [
                {"battery_level": 19}]


def test_migrate_command_creates_tables(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "DATABASE_URL": db, "CALLBACK_HTTP_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-m", "callback_server", "migrate"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = {r["name"] for r in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"mnt_robots_management", "mnt_robot_events", "mqtt_message_log",
            "mqtt_dead_letters", "device_commands"} <= names
    env["DATABASE_URL"] = "postgres://nope"
    out = subprocess.run([sys.executable, "-m", "callback_server", "migrate"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "DATABASE_URL" in out.stderr


def test_retention_prunes_the_message_log_and_keeps_robot_state(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    p = f"t{uuid.uuid4().hex[:8]}"
    # 0.00005 days = 4.3 s: long enough to see the row stored, short enough to wait for
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p, CALLBACK_TOKEN="rule-token",
                         LOG_RETENTION_DAYS="0.00005", RETENTION_INTERVAL_SECONDS="0.2") as cs:
        r = httpx.post(cs.url + "/callback/messages", json=envelope("acme", "R7", 1),
                       headers={**TOKEN, "X-Mqtt-Topic": f"{p}/org/acme/device/R7/power"})
        assert r.status_code == 200, r.text
        assert len(query(db, "SELECT id FROM mqtt_message_log")) == 1
        cs.wait_health("pruned", {"mqtt_message_log": 1, "mqtt_dead_letters": 0,
                                   "device_commands": 0, "robot_history": 0,
                                   "robot_tasks": 0, "webhook_deliveries": 0})
        assert query(db, "SELECT id FROM mqtt_message_log") == []
        assert httpx.get(cs.url + "/robots/R7", headers=cs.auth).json()["battery_level"] == 1
        assert 'callback_rows_pruned_total{table="mqtt_message_log"} 1.0' in \
            httpx.get(cs.url + "/metrics", headers=cs.auth).text


def test_replicas_on_one_host_share_the_port_only_when_each_says_so(tmp_path: Path) -> None:
    """CALLBACK_HTTP_REUSE_PORT: two replicas listen on one port and both take new
    connections (each has a database of its own here, so where a POST landed shows);
    a third process without the setting still exits 3 on the taken port."""
    p = f"t{uuid.uuid4().hex[:8]}"
    dbs = [f"sqlite:///{tmp_path / f'cb{i}.db'}" for i in range(2)]
    common = {"TOPIC_PREFIX": p, "CALLBACK_TOKEN": "rule-token", "SHARE_GROUP": p,
              "CALLBACK_HTTP_REUSE_PORT": "true"}
    with callback_server(tmp_path, BROKER, dbs[0], name="a", **common) as a:
        b = callback_server(tmp_path, BROKER, dbs[1], name="b", CALLBACK_HTTP_PORT=str(a.port),
                            **common)
        b.port = a.port
        with b:
            eventually(lambda: "listening on" in b.log_path.read_text(),
                       what="replica b listening")
            topic = f"{p}/org/acme/device/R1/power"
            for i in range(24):  # a connection each: the kernel picks a replica per connection
                r = httpx.post(a.url + "/callback/messages", json=envelope("acme", "R1", i),
                               headers={**TOKEN, "X-Mqtt-Topic": topic})
                assert r.status_code == 200 and r.json()["stored"] == 1, r.text
            lonely = subprocess.run(
                [sys.executable, "-m", "callback_server", "run"], capture_output=True,
                text=True, timeout=60, check=False,
                env={**b.env, "CALLBACK_HTTP_REUSE_PORT": "false",
                     "DATABASE_URL": f"sqlite:///{tmp_path / 'cb2.db'}"})
    assert lonely.returncode == 3 and "cannot listen on" in lonely.stderr, lonely.stderr
    took = [len(query(db, "SELECT id FROM mqtt_message_log")) for db in dbs]
    assert sum(took) == 24 and min(took) > 0, took


def test_replicas_named_as_the_systemd_template_names_them_split_the_stream(
        tmp_path: Path) -> None:
    """callback-server@1 and @2 share one environment file (one MQTT_CLIENT_ID, no share
    group, no reuse-port setting): CALLBACK_REPLICA alone lets the second take the first's
    port, and gives each a broker session of its own in one share group, so every
    message is stored once and both take some (one id for both would drop a session at
    each connect)."""
    p = f"t{uuid.uuid4().hex[:8]}"
    dbs = [f"sqlite:///{tmp_path / f'cb{i}.db'}" for i in range(2)]
    common = {"TOPIC_PREFIX": p, "MQTT_CLIENT_ID": f"cs-{p}"}
    with callback_server(tmp_path, BROKER, dbs[0], name="a", CALLBACK_REPLICA="1",
                         **common) as a:
        b = callback_server(tmp_path, BROKER, dbs[1], name="b", CALLBACK_HTTP_PORT=str(a.port),
                            CALLBACK_REPLICA="2", **common)
        b.port = a.port
        with b:
            eventually(lambda: "listening on" in b.log_path.read_text(),
                       what="replica b listening")
            client = mqtt.Client(CallbackAPIVersion.VERSION2)
            client.connect("127.0.0.1", 1883)
            client.loop_start()
            for i in range(40):
                body = json.dumps(envelope("acme", f"R{i}", i)).encode()
                client.publish(f"{p}/org/acme/device/R{i}/power", body, qos=1) \
                    .wait_for_publish()
            client.disconnect()
            client.loop_stop()
            took = eventually(
                lambda: [len(query(db, "SELECT id FROM mqtt_message_log")) for db in dbs],
                accept=lambda t: sum(t) >= 40, ignoring=(sqlite3.OperationalError,),
                what="40 messages stored")
    assert sum(took) == 40 and min(took) > 0, took
