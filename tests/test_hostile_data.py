"""Data a buggy or hostile sender gets wrong, through the real edge agent, Mosquitto and
callback server: far-future robot times, NaN, out-of-range battery, reused TraceIds,
robots named like gateways, shop-level callbacks, gateway traffic on HTTP ingest."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.dbutil import query
from tests.support.mqtt_probe import Probe, Seen
from tests.support.services import ServiceProcess, callback_server, edge_agent
from tests.support.waiting import eventually
from tests.test_strictjson import strict_loads

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
CODE = {"CallbackCode": "test-code"}
RULE = {"X-Callback-Token": "rule-token"}
GATEWAY = "site-a"


@dataclass
class Pipeline:
    prefix: str
    org: str
    db: str
    edge: ServiceProcess
    cloud: ServiceProcess
    probe: Probe

    def webhook(self, body: dict[str, Any] | bytes, trace: str | None = None) -> httpx.Response:
        headers = {**CODE, **({"TraceId": trace} if trace else {})}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(self.edge.url + "/api/pudu/webhook", content=content, headers=headers)
        assert r.status_code == 200, r.text
        return r

    def robot(self, sn: str, **expect: Any) -> dict[str, Any]:
        """The robot once the cloud shows ``expect`` (polling its read API, bounded)."""
        def row() -> dict[str, Any]:
            r = httpx.get(f"{self.cloud.url}/robots/{sn}", headers=self.cloud.auth)
            return r.json() if r.status_code == 200 else {}

        return eventually(row, within=10, what=f"{sn} showing {expect}",
                          accept=lambda got: got and all(got.get(k) == v
                                                         for k, v in expect.items()))

    def envelopes(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` robot envelopes published, each parsed strictly."""
        def robots_only(messages: list[Seen]) -> list[Seen]:
            return [m for m in messages if not m.topic.endswith(("/presence", "/telemetry"))]

        got = self.probe.wait_until(lambda seen: len(robots_only(seen)) >= count,
                                    f"{count} robot envelopes published", timeout=10)
        return [strict_loads(m.payload) for m in robots_only(got)]


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    prefix, org = f"h{uuid.uuid4().hex[:8]}", "acme"
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    with Probe(BROKER, f"{prefix}/org/{org}/device/+/#") as probe, \
            callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=prefix,
                            CALLBACK_TOKEN="rule-token") as cloud, \
            edge_agent(tmp_path, BROKER, org=org, gateway=GATEWAY, TOPIC_PREFIX=prefix) as edge:
        yield Pipeline(prefix, org, db, edge, cloud, probe)


def status(sn: str, state: str, notify_ms: int, battery: Any = 50) -> dict[str, Any]:
    return {"callback_type": "notifyRobotStatus",
            "data": {"sn": sn, "run_state": state, "battery": battery,
                     "notify_timestamp": notify_ms}}


def test_far_future_time_then_current_state_wins_edge_to_cloud(pipeline: Pipeline) -> None:
    pipeline.webhook(status("R1", "ONLINE", 9_999_999_999))       # year 2286, in seconds
    now_ms = int(time.time() * 1000)  # the robot's next real state, after the bad one
    pipeline.webhook(status("R1", "OFFLINE", now_ms))
    row = pipeline.robot("R1", status="offline")
    assert row["last_ts"] == pytest.approx(now_ms / 1000)
    future, current = pipeline.envelopes(2)
    assert future["raw"]["notify_timestamp"] == 9_999_999_999    # kept as sent
    assert future["ts"] == future["received_at"]
    assert "ahead of the gateway clock" in future["notes"][0]
    assert "notes" not in current
    metrics = httpx.get(pipeline.edge.admin_url + "/metrics")
    assert "edge_clock_skew_total 1.0" in metrics.text


def test_far_future_ingest_is_ordered_by_the_server_clock(pipeline: Pipeline) -> None:
    url = pipeline.cloud.url + "/callback/messages"
    base = {"v": 1, "type": "notifyRobotStatus", "channel": "status", "org": pipeline.org,
            "device": "R9", "gateway": GATEWAY}
    for i, state in enumerate(("busy", "idle")):  # year 2100, then the real next state
        ts = 4_102_444_800 if i == 0 else time.time()
        r = httpx.post(url, headers=RULE, json={**base, "id": f"f{i}", "ts": ts,
                                                "data": {"status": state}})
        assert r.status_code == 200, r.text
    assert pipeline.robot("R9")["status"] == "idle"
    logged = query(pipeline.db, "SELECT payload FROM mqtt_message_log WHERE id = 'f0'")
    notes = strict_loads(logged[0]["payload"])["notes"]
    assert "ahead of the server clock" in notes[0]
    assert pipeline.cloud.health()["clock_skewed"] == 1


def test_nan_and_huge_numbers_leave_as_strict_json_with_notes(pipeline: Pipeline) -> None:
    raw = (b'{"callback_type": "notifyCustomCall", "data": {"sn": "R2", "x": NaN,'
           b' "y": -Infinity, "z": 1e400, "big": 123456789012345678901234567890, "ok": 1.5}}')
    pipeline.webhook(raw)
    pipeline.webhook(status("R2", "IDLE", int(time.time() * 1000), battery=255))
    custom, stat = pipeline.envelopes(2)  # strict_loads raised on any NaN/Infinity
    assert custom["raw"] == {"sn": "R2", "x": None, "y": None, "z": None, "big": None,
                             "ok": 1.5}
    assert len(custom["notes"]) == 4
    assert "battery_level" not in stat["data"] and stat["raw"]["battery"] == 255
    assert "outside 0-100" in stat["notes"][0]
    assert pipeline.robot("R2", status="idle")["battery_level"] is None


def test_one_trace_id_with_three_bodies_is_three_callbacks(pipeline: Pipeline) -> None:
    now_ms = int(time.time() * 1000)
    answers = [pipeline.webhook({"callback_type": "notifyRobotPower",
                                 "data": {"sn": "R3", "power": p, "notify_timestamp": now_ms + p}},
                                trace="reused")
               for p in (40, 41, 42)]
    assert [a.json()["data"]["duplicate"] for a in answers] == [False, False, False]
    same = {"callback_type": "notifyRobotPower",
            "data": {"sn": "R3", "power": 43, "notify_timestamp": now_ms + 43}}
    again = [pipeline.webhook(same, trace=t) for t in ("a", "a", "b")]
    assert [a.json()["data"]["duplicate"] for a in again] == [False, True, True]
    levels = [e["data"]["battery_level"] for e in pipeline.envelopes(4)]
    assert levels == [40, 41, 42, 43]
    assert pipeline.robot("R3", battery_level=43)


def test_robot_named_like_its_gateway_is_a_robot_and_shop_callbacks_are_not(
        pipeline: Pipeline) -> None:
    shop = {"callback_type": "mapElementChange", "data": {"shop_id": 7, "map_name": "F1"}}
    assert pipeline.webhook(shop).json()["data"]["topic"].endswith(
        f"/device/{GATEWAY}/callback/mapElementChange")
    pipeline.envelopes(1)
    pipeline.webhook(status(GATEWAY, "ONLINE", int(time.time() * 1000)))
    row = pipeline.robot(GATEWAY, status="online")
    assert row["robot_sn"] == GATEWAY
    logged = query(pipeline.db, "SELECT channel FROM mqtt_message_log ORDER BY channel")
    assert [r["channel"] for r in logged] == ["callback/mapElementChange", "status"]
    robots = query(pipeline.db, "SELECT robot_sn, last_ts FROM mnt_robots_management")
    assert len(robots) == 1  # the shop-level callback made no robot and moved no state


def test_gateway_telemetry_and_responses_pushed_to_ingest_are_handled(
        pipeline: Pipeline) -> None:
    url = pipeline.cloud.url + "/callback/messages"
    topic = f"{pipeline.prefix}/org/{pipeline.org}/device/{GATEWAY}"
    telemetry = httpx.post(url, headers={**RULE, "X-Mqtt-Topic": f"{topic}/telemetry"},
                           json={"status": "healthy", "outbox_depth": 0})
    response = httpx.post(url, headers=RULE, json={
        "topic": f"{topic}/response", "messageId": "m1", "status": "success", "result": {}})
    for r in (telemetry, response):
        assert r.status_code == 200, r.text
        assert r.json()["handled"] == 1 and r.json()["stored"] == 0
    assert query(pipeline.db, "SELECT COUNT(*) AS n FROM mqtt_dead_letters")[0]["n"] == 0
