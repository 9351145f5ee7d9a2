"""Choosing what leaves the site (issue 17), through a real edge agent and Mosquitto:
DROP_TYPES / FORWARD_CHANNELS and MIN_INTERVAL_SECONDS downsampling."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.mqtt_probe import Probe, Seen
from tests.support.services import ServiceProcess, edge_agent
from tests.test_cli import cli, edge_env

pytestmark = pytest.mark.integration

BROKER = "mqtt://127.0.0.1:1883"
CODE = {"CallbackCode": "test-code"}
T0 = 1_761_700_000  # robot time of the first callback


def pose(sn: str, n: int) -> dict[str, object]:
    return {"callback_type": "notifyRobotPose",
            "data": {"sn": sn, "x": float(n), "y": 1.5, "yaw": 90.0, "timestamp": T0 + n}}


def status(sn: str, n: int) -> dict[str, object]:
    return {"callback_type": "notifyRobotStatus",
            "data": {"sn": sn, "run_state": "WORKING" if n % 2 else "IDLE",
                     "timestamp": T0 + n, "notify_timestamp": (T0 + n) * 1000 + 1}}


def post(agent: ServiceProcess, body: dict[str, object]) -> httpx.Response:
    r = httpx.post(agent.url + "/api/pudu/webhook", headers=CODE,
                   content=json.dumps(body).encode(), timeout=10)
    assert r.status_code == 200, r.text
    return r


def on(seen: list[Seen], channel: str) -> list[tuple[Seen, dict[str, Any]]]:
    return [(m, json.loads(m.payload)) for m in seen if m.topic.endswith("/" + channel)]


def ever_stored(outbox: Path) -> int:
    """How many callbacks ever reached the outbox: each leaves its retry key there."""
    with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0])


def test_fifty_poses_in_ten_seconds_arrive_as_two_or_three_the_last_one_last(
        tmp_path: Path) -> None:
    org, sn = f"o{uuid.uuid4().hex[:8]}", "DS-1"
    posted: dict[float, float] = {}  # pose x -> when it was posted
    with Probe(BROKER, f"org/{org}/#") as probe, \
            edge_agent(tmp_path, BROKER, org=org, MIN_INTERVAL_SECONDS="pose=5") as agent:
        start = time.monotonic()
        for n in range(50):  # paced like a robot: one pose and one status every 0.2 s
            time.sleep(max(0.0, start + n * 0.2 - time.monotonic()))
            posted[float(n)] = time.time()
            post(agent, pose(sn, n))
            post(agent, status(sn, n))

        def last_pose_arrived() -> bool:
            return any(env["data"]["x"] == 49.0
                       for _, env in on(probe.messages, "pose"))

        probe.wait_until(lambda _: last_pose_arrived(), "the last pose", timeout=20)
        seen = list(probe.messages)
        downsampled = agent.metric('edge_downsampled_total{channel="pose"}')
    poses = on(seen, "pose")
    assert 2 <= len(poses) <= 3, [env["data"] for _, env in poses]
    assert poses[-1][1]["data"]["x"] == 49.0
    for m, env in poses:  # none later than one interval (1 s for a loaded shared machine)
        late = m.at - posted[env["data"]["x"]]
        assert late <= 5 + 1.0, (env["data"], late)
    assert downsampled == 50 - len(poses)
    statuses = [env["ts"] for _, env in on(seen, "status")]
    assert statuses == sorted(statuses) and len(statuses) == 50  # all of them, in order


def test_drop_types_answers_200_counts_and_stores_nothing(tmp_path: Path) -> None:
    org, sn = f"o{uuid.uuid4().hex[:8]}", "DROP-1"
    outbox = tmp_path / "outbox-gw1.db"
    with Probe(BROKER, f"org/{org}/#") as probe, \
            edge_agent(tmp_path, BROKER, org=org, DROP_TYPES="notifyRobotPose") as agent:
        for n in range(5):
            answer = post(agent, pose(sn, n)).json()
            assert answer["status"] == "success" and answer["data"]["forwarded"] is False
        for n in range(3):
            post(agent, status(sn, n))
        probe.wait_for(1 + 3)  # the retained presence, then the three statuses
        dropped = agent.metric('edge_webhooks_total{outcome="dropped",type="notifyRobotPose"}')
        accepted = agent.metric('edge_webhooks_total{outcome="accepted",type="notifyRobotStatus"}')
        stored = ever_stored(outbox)
    assert (dropped, accepted) == (5, 3)
    assert stored == 3  # the poses never reached the outbox
    assert on(probe.messages, "pose") == []
    assert len(on(probe.messages, "status")) == 3


def test_forward_channels_keeps_channels_left_out_home(tmp_path: Path) -> None:
    org, sn = f"o{uuid.uuid4().hex[:8]}", "FWD-1"
    outbox = tmp_path / "outbox-gw1.db"
    with Probe(BROKER, f"org/{org}/#") as probe, \
            edge_agent(tmp_path, BROKER, org=org, FORWARD_CHANNELS="status,event") as agent:
        for n in range(4):
            answer = post(agent, pose(sn, n)).json()
            assert answer["status"] == "success" and answer["data"]["forwarded"] is False
        for n in range(3):
            assert "forwarded" not in post(agent, status(sn, n)).json()["data"]
        probe.wait_for(1 + 3)  # the retained presence, then the three statuses
        dropped = agent.metric('edge_webhooks_total{outcome="dropped",type="notifyRobotPose"}')
        stored = ever_stored(outbox)
        seen = list(probe.messages)
    assert dropped == 4
    assert stored == 3  # only the statuses were ever written to the outbox
    assert on(seen, "pose") == []
    assert len(on(seen, "status")) == 3


def test_a_pose_held_when_the_agent_is_killed_is_published_after_the_restart(
        tmp_path: Path) -> None:
    org, sn = f"o{uuid.uuid4().hex[:8]}", "KILL-1"
    with Probe(BROKER, f"org/{org}/#") as probe:
        agent = edge_agent(tmp_path, BROKER, org=org, MIN_INTERVAL_SECONDS="pose=600")
        with agent:
            post(agent, pose(sn, 0))  # at once
            post(agent, pose(sn, 1))  # held for 10 minutes
            agent.wait_health("outbox_held", 1)
            agent.kill()  # SIGKILL inside the interval
        with edge_agent(tmp_path, BROKER, org=org, MIN_INTERVAL_SECONDS="pose=600"):
            probe.wait_until(lambda seen: len(on(seen, "pose")) >= 2, "both poses", timeout=20)
    assert [env["data"]["x"] for _, env in on(probe.messages, "pose")] == [0.0, 1.0]


def test_check_config_warns_about_status_and_events_left_out_but_passes(
        tmp_path: Path) -> None:
    done = cli("edge_agent", "check-config", env=edge_env(
        tmp_path, FORWARD_CHANNELS="pose,power", DROP_TYPES="robotErrorWarning,notifyRobotPsoe",
        MIN_INTERVAL_SECONDS="pose=5,power=30"))
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.splitlines()
    assert any("leaves out status" in w for w in warnings), warnings
    assert any("leaves out event" in w for w in warnings), warnings
    assert any("robotErrorWarning" in w for w in warnings), warnings
    assert any("notifyrobotpsoe is not a documented" in w for w in warnings), warnings
    shown = json.loads(done.stdout)
    assert shown["forward_channels"] == ["pose", "power"]
    assert shown["min_interval_seconds"] == {"pose": 5.0, "power": 30.0}
    quiet = cli("edge_agent", "check-config", env=edge_env(tmp_path))
    assert quiet.returncode == 0 and "warning" not in quiet.stderr
