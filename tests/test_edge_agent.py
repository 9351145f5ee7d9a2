"""The edge agent as a real process against a real Mosquitto (issue: edge agent)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.topic import CHANNEL_OF_TYPE
from tests.support.mqtt_probe import Probe, Seen
from tests.support.services import ServiceProcess, edge_agent

pytestmark = pytest.mark.integration

BROKER = "mqtt://127.0.0.1:1883"
SAMPLES = Path(__file__).parent / "samples" / "pudu"
CODE = {"CallbackCode": "test-code"}
CHANNEL = CHANNEL_OF_TYPE


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with edge_agent(tmp_path_factory.mktemp("edge"), BROKER, org="badinput") as agent:
        yield agent


def sample_files() -> list[Path]:
    files = sorted(SAMPLES.rglob("*.json"))
    assert len(files) >= 11, f"samples missing under {SAMPLES}"
    return files


def robot_messages(seen: list[Seen]) -> list[dict[str, object]]:
    """Envelopes on robot channels (not the gateway's presence/telemetry)."""
    out = []
    for m in seen:
        if m.topic.rsplit("/", 1)[-1] in ("presence", "telemetry"):
            continue
        out.append({"topic": m.topic, **json.loads(m.payload)})
    return out


def post(agent: ServiceProcess, body: object, headers: dict[str, str] | None = None,
         content: bytes | None = None) -> httpx.Response:
    return httpx.post(
        agent.url + "/api/pudu/webhook", headers={**CODE, **(headers or {})},
        content=content if content is not None else json.dumps(body).encode(), timeout=10,
    )


def test_every_sample_arrives_on_its_topic_with_the_envelope(tmp_path: Path) -> None:
    org = f"o{uuid.uuid4().hex[:8]}"
    files = sample_files()
    with Probe(BROKER, f"org/{org}/#") as probe, edge_agent(tmp_path, BROKER, org=org) as agent:
        for path in files:
            body = json.loads(path.read_text())
            r = post(agent, body)
            assert r.status_code == 200, (path.name, r.text)
            answer = r.json()
            assert answer["status"] == "success"
            assert answer["data"]["robot_sn"] == body["data"]["sn"]
        # +1: the gateway's retained "online" presence
        got = robot_messages(probe.wait_for(len(files) + 1))
    assert len(got) == len(files)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for env in got:
        by_type.setdefault(str(env["type"]), []).append(env)
    for path in files:
        body = json.loads(path.read_text())
        ctype, data = body["callback_type"], body["data"]
        env = next(e for e in by_type[ctype] if e["raw"] == data)
        channel = CHANNEL.get(ctype, f"callback/{ctype}")
        assert env["topic"] == f"org/{org}/device/{data['sn']}/{channel}"
        assert env["v"] == 1 and env["org"] == org and env["gateway"] == "gw1"
        assert env["device"] == data["sn"] and env["channel"] == channel
        expected_ts = data.get("notify_timestamp", data["timestamp"] * 1000) / 1000
        assert env["ts"] == pytest.approx(expected_ts)
    status = next(e for e in by_type["robotStatus"])
    assert status["data"]["status"] == "online"
    power = {e["raw"]["sn"]: e["data"] for e in by_type["notifyRobotPower"]}
    assert power["811064412050012"] == {"battery_level": 75, "charge_state": "discharging",
                                        "mac": "B0:0C:9D:59:16:E8"}
    assert power["TS1732946965085"]["charge_state"] == "idle"
    warning = by_type["robotErrorWarning"][0]
    assert warning["data"]["event_level"] == "warning"
    assert warning["data"]["event_id"] == "vir_1726794796"


def test_pudu_retries_are_answered_200_and_published_once(tmp_path: Path) -> None:
    org = f"o{uuid.uuid4().hex[:8]}"
    body = json.loads((SAMPLES / "robotStatus.json").read_text())
    other = {"callback_type": "notifyRobotPose",
             "data": {"sn": "R2", "x": 1, "y": 2, "yaw": 3, "timestamp": 1700000000}}
    with Probe(BROKER, f"org/{org}/device/+/+") as probe, \
            edge_agent(tmp_path, BROKER, org=org) as agent:
        first = post(agent, body, {"TraceId": "t-1"})
        retried = post(agent, body, {"TraceId": "t-1"})
        # a retry that came with a new TraceId but the same body is still the same callback
        same_body = post(agent, body, {"TraceId": "t-2"})
        assert [r.status_code for r in (first, retried, same_body)] == [200, 200, 200]
        assert not first.json()["data"]["duplicate"]
        assert retried.json()["data"]["duplicate"] and same_body.json()["data"]["duplicate"]
        assert post(agent, other).status_code == 200  # a marker that arrives after them
        got = robot_messages(probe.wait_for(3))  # presence + 2 robot messages
    assert [e["type"] for e in got] == ["robotStatus", "notifyRobotPose"]


@pytest.mark.parametrize(
    ("headers", "content", "status", "needle"),
    [
        ({"CallbackCode": "wrong"}, b"{}", 401, "CallbackCode"),
        ({"CallbackCode": ""}, b"{}", 401, "CallbackCode"),
        ({}, b"{not json", 400, "JSON"),
        ({}, b'{"callback_type": "robotStatus", "data": {"run_status": "ONLINE"}}', 422,
         "data.sn"),
        ({}, b'{"callback_type": "notifyRobotPower", "data": {"sn": "A", "power": "lots"}}',
         422, "data.power"),
        ({}, b'{"callback_type": 5, "data": {"sn": "A"}}', 422, "callback_type"),
        ({}, b'{"callback_type": "robotStatus", "data": []}', 422, "data"),
        ({}, b"[1, 2]", 400, "object"),
        ({}, b'{"callback_type": "robotStatus", "data": {"sn": "a/b"}}', 422, "data.sn"),
    ],
)
def test_bad_input_gets_a_precise_error(
    edge: ServiceProcess, headers: dict[str, str], content: bytes, status: int, needle: str
) -> None:
    r = httpx.post(edge.url + "/api/pudu/webhook", headers={**CODE, **headers}, content=content)
    assert r.status_code == status, r.text
    assert needle.lower() in r.text.lower()


def test_missing_code_header_and_oversized_body(edge: ServiceProcess) -> None:
    r = httpx.post(edge.url + "/api/pudu/webhook", content=b"{}")
    assert r.status_code == 401
    big = json.dumps({"callback_type": "robotStatus",
                      "data": {"sn": "A", "pad": "x" * 70_000}}).encode()
    r = httpx.post(edge.url + "/api/pudu/webhook", headers=CODE, content=big)
    assert r.status_code == 413 and "larger than" in r.json()["message"]


def test_unknown_types_case_and_milliseconds_are_accepted(tmp_path: Path) -> None:
    org = f"o{uuid.uuid4().hex[:8]}"
    with Probe(BROKER, f"org/{org}/#") as probe, edge_agent(tmp_path, BROKER, org=org) as agent:
        assert post(agent, {"callback_type": "notifyBrandNewThing",
                            "data": {"sn": "R9", "timestamp": 1700000000}}).status_code == 200
        assert post(agent, {"callback_type": "ROBOTSTATUS",
                            "data": {"sn": "R9", "run_status": "OffLine",
                                     "timestamp": 1700000000123}}).status_code == 200
        # shop-level callback without sn: the gateway's own topic
        assert post(agent, {"callback_type": "mapElementChange",
                            "data": {"shop_id": 7, "map_name": "m",
                                     "timestamp": 1700000000}}).status_code == 200
        got = robot_messages(probe.wait_for(4))
    topics = [e["topic"] for e in got]
    assert topics == [f"org/{org}/device/R9/callback/notifyBrandNewThing",
                      f"org/{org}/device/R9/status",
                      f"org/{org}/device/gw1/callback/mapElementChange"]
    assert got[1]["data"]["status"] == "offline"  # type: ignore[index]
    assert got[1]["ts"] == pytest.approx(1700000000.123)


def test_missing_callback_code_is_a_startup_error(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PUDU_CALLBACK_CODE"}
    proc = subprocess.run([sys.executable, "-m", "edge_agent", "run"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "PUDU_CALLBACK_CODE" in proc.stderr


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    cfg = tmp_path / "edge.yaml"
    cfg.write_text("pudu_callback_code: s3cret-code\norg_id: acme\nhttp_port: 9000\n")
    env = {**os.environ, "EDGE_HTTP_PORT": "9100", "PROXY_TOKEN": "tok-secret"}
    proc = subprocess.run([sys.executable, "-m", "edge_agent", "--config", str(cfg),
                           "check-config"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["org_id"] == "acme" and shown["http_port"] == 9100  # env overrides file
    assert "s3cret" not in proc.stdout and "tok-secret" not in proc.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("pudu_callback_code: x\nhttp_port: nope\n")
    proc = subprocess.run([sys.executable, "-m", "edge_agent", "--config", str(bad),
                           "check-config"], env=env | {"EDGE_HTTP_PORT": ""},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "http_port" in proc.stderr


def test_rest_proxy_only_on_the_admin_listener_and_confined_to_the_org(tmp_path: Path) -> None:
    org = f"o{uuid.uuid4().hex[:8]}"
    with Probe(BROKER, f"org/{org}/device/gw1/telemetry") as probe, \
            edge_agent(tmp_path, BROKER, org=org, PROXY_TOKEN="admin-tok") as agent:
        admin = f"http://127.0.0.1:{agent.env['EDGE_ADMIN_PORT']}"
        auth = {"Authorization": "Bearer admin-tok"}
        msg = {"topic": f"org/{org}/device/gw1/telemetry", "payload": {"hello": 1}}
        assert httpx.post(agent.url + "/mqtt/publish", json=msg, headers=auth).status_code == 404
        assert httpx.post(admin + "/mqtt/publish", json=msg).status_code == 401
        r = httpx.post(admin + "/mqtt/publish", json=msg, headers=auth)
        assert r.status_code == 200, r.text
        other = {"topic": "org/someone-else/device/x/command", "payload": "x"}
        assert httpx.post(admin + "/mqtt/publish", json=other, headers=auth).status_code == 403
        sys_topic = {"topic": "$SYS/broker/x", "payload": "x"}
        assert httpx.post(admin + "/mqtt/publish", json=sys_topic,
                          headers=auth).status_code in (403, 422)
        got = probe.wait_for(1)
    assert json.loads(got[0].payload) == {"hello": 1}


def test_admin_listener_serves_metrics_and_docs_and_the_proxy_only_with_a_token(
        edge: ServiceProcess) -> None:
    admin = edge.admin_url
    assert httpx.get(admin + "/mqtt/status").status_code == 404  # no PROXY_TOKEN: no proxy
    assert "edge_webhooks_total" in httpx.get(admin + "/metrics").text
    assert httpx.get(admin + "/docs").status_code == 200
    paths = httpx.get(admin + "/openapi.json").json()["paths"]
    assert "/api/pudu/webhook" in paths  # the docs describe the public webhook too
    # The public listener serves the webhook and its health, nothing else.
    for path in ("/metrics", "/docs", "/openapi.json", "/mqtt/status"):
        assert httpx.get(edge.url + path).status_code == 404, path
    assert httpx.get(edge.url + "/api/pudu/webhook/health").status_code == 200


def test_lone_surrogate_in_a_field_is_accepted_not_a_500(edge: ServiceProcess) -> None:
    body = (b'{"callback_type": "notifyCleanStatus", "data": {"sn": "S1", '
            b'"task_name": "\\ud800", "status": "BEGIN", "timestamp": 1700000000}}')
    r = httpx.post(edge.url + "/api/pudu/webhook", headers=CODE, content=body)
    assert r.status_code in (200, 422), r.text


def test_callbacks_one_at_a_time_cost_one_disk_commit_each(tmp_path: Path) -> None:
    """A gateway's usual load: a callback, its publish, its PUBACK, then the next. Each
    costs one commit of the outbox (an fsync of the gateway's disk), not two: the removal
    after the PUBACK rides with the next callback's commit (edge_outbox_commits_total).
    And each commit writes two pages to the WAL (the entry's and its retry key's), not
    five: the SD card's wear."""
    org = f"o{uuid.uuid4().hex[:8]}"
    wal = tmp_path / "outbox-gw1.db-wal"

    def commits() -> float:
        text = httpx.get(agent.admin_url + "/metrics", timeout=5).text
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("edge_outbox_commits_total ")))

    with edge_agent(tmp_path, BROKER, org=org) as agent:
        published = agent.health()["published"]
        before, wal_before = commits(), wal.stat().st_size
        for i in range(20):
            body = {"callback_type": "notifyRobotPower",
                    "data": {"sn": "R1", "power": 50 + i, "timestamp": 1700000000 + i}}
            assert post(agent, body).status_code == 200
            agent.wait_health_at_least("published", published + i + 1)
        spent = commits() - before
        pages = (wal.stat().st_size - wal_before) / (4096 + 24) / 20  # a WAL frame a page
    assert spent < 30, f"{spent:g} commits for 20 callbacks (40 with a commit per removal)"
    assert pages < 3, f"{pages:.1f} WAL pages a callback (5 with the indexes and the mark)"
