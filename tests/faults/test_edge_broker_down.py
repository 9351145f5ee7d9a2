"""Edge agent under faults: broker down, agent killed (private Mosquitto per test)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.mqtt_probe import Probe
from tests.support.procs import MosquittoProcess
from tests.support.services import edge_agent

pytestmark = pytest.mark.integration
ROBOTS = ("RA", "RB", "RC")


def status_callback(sn: str, i: int) -> bytes:
    return json.dumps({
        "callback_type": "notifyRobotStatus",
        "data": {"sn": sn, "battery": i, "run_state": "BUSY", "timestamp": 1700000000 + i,
                 "notify_timestamp": (1700000000 + i) * 1000},
    }).encode()


def post_all(url: str, count: int) -> None:
    with httpx.Client(base_url=url, headers={"CallbackCode": "test-code"}, timeout=10) as c:
        for i in range(count):
            for sn in ROBOTS:
                r = c.post("/api/pudu/webhook", content=status_callback(sn, i))
                assert r.status_code == 200, r.text


def batteries_per_robot(probe: Probe, count: int) -> dict[str, list[int]]:
    seen = probe.wait_for(count * len(ROBOTS))
    out: dict[str, list[int]] = {}
    for m in seen:
        env = json.loads(m.payload)
        out.setdefault(env["device"], []).append(env["data"]["battery_level"])
    return out


def persistent_probe(broker: MosquittoProcess, org: str) -> Probe:
    """A consumer that already has a session, so the broker queues for it while away."""
    probe = Probe(broker.url, f"org/{org}/device/+/status", client_id=f"probe-{org}",
                  persistent=True)
    probe.start()
    probe.stop()
    return probe


def test_broker_down_callbacks_answered_then_all_delivered_in_order(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    org = f"o{uuid.uuid4().hex[:8]}"
    probe = persistent_probe(mosquitto, org)
    mosquitto.stop()
    with edge_agent(tmp_path, mosquitto.url, org=org) as agent:
        post_all(agent.url, 50)
        health = agent.health()
        assert health["status"] == "degraded" and health["broker_connected"] is False
        assert health["outbox_depth"] == 150
        mosquitto.start()
        with probe:
            got = batteries_per_robot(probe, 50)
    assert got == {sn: list(range(50)) for sn in ROBOTS}


def test_agent_killed_with_backlog_loses_nothing_after_restart(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    org = f"o{uuid.uuid4().hex[:8]}"
    probe = persistent_probe(mosquitto, org)
    mosquitto.stop()
    agent = edge_agent(tmp_path, mosquitto.url, org=org).start()
    try:
        post_all(agent.url, 40)
    finally:
        agent.kill()  # SIGKILL with 120 entries waiting for a broker
    mosquitto.start()
    with edge_agent(tmp_path, mosquitto.url, org=org), probe:
        got = batteries_per_robot(probe, 40)
    assert got == {sn: list(range(40)) for sn in ROBOTS}
