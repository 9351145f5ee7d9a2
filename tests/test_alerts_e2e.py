"""Alerts end to end: webhooks -> edge agent -> Mosquitto -> two callback-server replicas on
a shared subscription -> one alert per condition -> signed deliveries to loopback receivers
and MQTT ``{prefix}/org/{org}/alerts``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.dbutil import query
from tests.support.mqtt_probe import Probe
from tests.support.services import ServiceProcess, callback_server, edge_agent
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
HEADERS = {"CallbackCode": "test-code"}


class Receiver:
    """A loopback webhook receiver; answers 500 to the first ``fail_first`` requests."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    outer.requests.append(({k.lower(): v for k, v in self.headers.items()},
                                           body))
                    failing = len(outer.requests) <= outer.fail_first
                self.send_response(500 if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, secret: str) -> list[dict[str, Any]]:
        """Every body received, each checked against its X-Signature first."""
        out = []
        for headers, body in list(self.requests):
            want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["x-signature"], want), "bad signature"
            out.append(json.loads(body))
        return out


def alerts(server: ServiceProcess, **params: str) -> list[dict[str, Any]]:
    r = httpx.get(server.url + "/alerts", params=params, headers=server.auth, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


def settled(*servers: ServiceProcess) -> bool:
    """Every replica has evaluated what it committed."""
    return all(s.health()["alerts"]["evaluating"] == 0 for s in servers)


def deliveries_done(*servers: ServiceProcess, extra: int) -> bool:
    """Every transition made by ``servers`` was delivered (or given up) once per
    subscription: as many outcomes as transitions, plus ``extra`` for narrower ones."""
    h = [s.health()["alerts"] for s in servers]
    made = sum(x["transitions"] for x in h)
    done = sum(x["delivered"] + x["undelivered"] for x in h)
    return all(x["delivering"] == 0 for x in h) and done == made + extra


def fault_on_both_replicas(agent_url: str, a: ServiceProcess, b: ServiceProcess,
                           now: int) -> int:
    """Post Fatal faults of robot RF1 (new error ids) one at a time until each replica has
    stored at least one: the shared subscription decides who gets which. How many sent."""
    def stored() -> list[int]:
        return [s.health()["stored"] for s in (a, b)]

    before = stored()
    with httpx.Client(base_url=agent_url, headers=HEADERS, timeout=10) as c:
        for i in range(20):
            counts = stored()
            if all(n > was for n, was in zip(counts, before, strict=True)):
                return i
            total = sum(counts)
            r = c.post("/api/pudu/webhook", json={
                "callback_type": "robotErrorWarning",
                "data": {"sn": "RF1", "error_level": "Fatal", "error_type": "Crash",
                         "error_detail": "motor", "error_id": f"f{i}", "timestamp": now + i}})
            assert r.status_code == 200, r.text
            eventually(lambda t=total: sum(stored()) > t,  # type: ignore[misc]
                       what="fault stored", within=30)
    raise AssertionError(f"20 faults and one replica stored none: {before} -> {stored()}")


def test_two_replicas_raise_each_alert_once_and_deliver_it_signed(
        tmp_path: Path, db_url: str) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    rules = tmp_path / "alert-rules.yaml"
    rules.write_text("sweep_seconds: 1\n"
                     "delivery: {attempts: 4, base_seconds: 0.1, cap_seconds: 0.3}\n")
    common = {"TOPIC_PREFIX": p, "SHARE_GROUP": f"g{p}", "ALERT_RULES_FILE": str(rules),
              "CALLBACK_URL_ALLOW": "127.0.0.1/32"}
    probe = Probe(BROKER, f"{p}/org/acme/alerts").start()
    try:
        with Receiver() as ok, Receiver(fail_first=2) as flaky, \
                callback_server(tmp_path, BROKER, db_url, name="a", **common) as a, \
                callback_server(tmp_path, BROKER, db_url, name="b", **common) as b, \
                edge_agent(tmp_path, BROKER, org="acme", TOPIC_PREFIX=p) as agent:
            subs = {}
            for name, receiver, body in (("ok", ok, {}), ("flaky", flaky,
                                                          {"rules": ["robot_fault"]})):
                r = httpx.post(a.url + "/alert-subscriptions", headers=a.auth,
                               json={"url": receiver.url, **body})
                assert r.status_code == 200, r.text
                subs[name] = r.json()
            # -- Fatal faults, until each replica has stored one: one robot_fault alert ------
            now = int(time.time())
            fault_on_both_replicas(agent.url, a, b, now)
            eventually(lambda: settled(a, b),
                       what="both replicas evaluated their faults", within=30)
            # Both replicas evaluated a Fatal fault of RF1 and tried to open its alert: one
            # did, the other found it open (the only transition so far, on either replica).
            assert sum(s.health()["alerts"]["transitions"] for s in (a, b)) == 1
            faults = alerts(b, rule="robot_fault")
            assert [(x["subject_id"], x["severity"], x["state"]) for x in faults] == [
                ("RF1", "critical", "open")]
            # -- battery 8 % discharging: battery_low at high; charging resolves it ----------
            with httpx.Client(base_url=agent.url, headers=HEADERS, timeout=10) as c:
                r = c.post("/api/pudu/webhook", json={"callback_type": "notifyRobotPower",
                           "data": {"sn": "RB1", "power": 8, "charge_stage": "IDLE",
                                    "timestamp": now}})
                assert r.status_code == 200
                low = eventually(lambda: alerts(a, rule="battery_low"),
                                 what="battery_low opened", within=30)
                assert [(x["subject_id"], x["severity"], x["state"]) for x in low] == [
                    ("RB1", "high", "open")]
                r = c.post("/api/pudu/webhook", json={"callback_type": "notifyRobotPower",
                           "data": {"sn": "RB1", "power": 9, "charge_stage": "CHARGING",
                                    "timestamp": now + 1}})
                assert r.status_code == 200
            eventually(lambda: alerts(b, rule="battery_low", state="resolved"),
                       what="battery_low resolved", within=30)
            # -- a gateway killed with SIGKILL: gateway_offline by its last will --------------
            doomed = edge_agent(tmp_path, BROKER, org="acme", gateway="gwk", TOPIC_PREFIX=p)
            with doomed:
                for server in (a, b):  # both replicas see presence, shared group or not
                    eventually(lambda s=server: any(  # type: ignore[misc]
                        g["gateway_id"] == "gwk" and g["state"] == "online" for g in
                        httpx.get(s.url + "/gateways", headers=s.auth).json()["items"]),
                        what="gwk online on every replica", within=30)
                doomed.kill()
                offline = eventually(lambda: alerts(a, rule="gateway_offline"),
                                     what="gateway_offline opened", within=30)
            assert [(x["subject_type"], x["subject_id"], x["state"]) for x in offline] == [
                ("gateway", "gwk", "open")]
            expected = {("opened", "robot_fault", "RF1"), ("opened", "battery_low", "RB1"),
                        ("resolved", "battery_low", "RB1"), ("opened", "gateway_offline", "gwk")}

            def delivered() -> list[dict[str, Any]] | None:
                got = ok.bodies(subs["ok"]["secret"])
                seen = {(x["transition"], x["rule"], x["subject_id"]) for x in got}
                return got if expected <= seen else None

            got = eventually(delivered, what="every transition delivered", within=30)
            flaky_log = eventually(lambda: [d for d in httpx.get(
                f"{a.url}/alert-subscriptions/{subs['flaky']['id']}/deliveries",
                headers=a.auth).json()["items"] if d["outcome"] == "delivered"] and httpx.get(
                f"{b.url}/alert-subscriptions/{subs['flaky']['id']}/deliveries",
                headers=b.auth).json()["items"], what="flaky receiver got it in the end", within=30)
            # Every transition either replica made has been delivered (to "ok", and the one
            # robot_fault transition to "flaky" too): a late duplicate would be in ``got``.
            eventually(lambda: deliveries_done(a, b, extra=1),
                       what="deliveries finished", within=30)
            got = ok.bodies(subs["ok"]["secret"])
            settle_alerts = query(db_url, "SELECT rule, subject_id FROM alerts")
    finally:
        probe.stop()
    # One transition each, delivered once each to the receiver that always answers 200.
    assert sorted((x["transition"], x["rule"], x["subject_id"]) for x in got) == sorted(expected)
    assert len({x["transition_id"] for x in got}) == len(got)
    assert all(x["subscription_id"] == subs["ok"]["id"] for x in got)
    assert {(r["rule"], r["subject_id"]) for r in settle_alerts} == {
        ("robot_fault", "RF1"), ("battery_low", "RB1"), ("gateway_offline", "gwk")}
    # The flaky receiver: 500, 500, then 200, each attempt signed and in the log.
    bodies = flaky.bodies(subs["flaky"]["secret"])
    assert len(bodies) == 3 and len({x["transition_id"] for x in bodies}) == 1
    assert [(d["attempt"], d["outcome"]) for d in reversed(flaky_log)] == [
        (1, "failed"), (2, "failed"), (3, "delivered")]
    assert {d["transition"] for d in flaky_log} == {"opened"}
    # MQTT: each transition once on the org's alerts topic, not retained.
    seen = [json.loads(m.payload) for m in probe.messages]
    assert all(not m.retain for m in probe.messages)
    assert sorted((x["transition"], x["rule"], x["subject_id"]) for x in seen
                  if (x["transition"], x["rule"], x["subject_id"]) in expected) == sorted(expected)
