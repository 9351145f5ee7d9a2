"""`make run`'s pipeline: a webhook shows up in the read API within a second."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.procs import wait_for_port
from tests.services import pick_port


def test_make_run_pipeline_answers_within_a_second(tmp_path: Path) -> None:
    edge, admin, cb, mqtt = pick_port(), pick_port(), pick_port(), pick_port()
    env = {**os.environ, "EDGE_HTTP_PORT": str(edge), "EDGE_ADMIN_PORT": str(admin),
           "CALLBACK_HTTP_PORT": str(cb), "DEMO_MQTT_PORT": str(mqtt),
           "OUTBOX_PATH": str(tmp_path / "outbox.db"),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'callback.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.demo"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port("127.0.0.1", cb, timeout=20)
        wait_for_port("127.0.0.1", edge, timeout=20)
        body = {"callback_type": "notifyRobotStatus",
                "data": {"sn": "DEMO-9", "battery": 42, "run_state": "BUSY",
                         "timestamp": 1700000000}}
        r = httpx.post(f"http://127.0.0.1:{edge}/api/pudu/webhook", json=body,
                       headers={"CallbackCode": "demo-callback-code"})
        assert r.status_code == 200, r.text
        posted = time.monotonic()
        robot = None
        while time.monotonic() - posted < 1.0:
            got = httpx.get(f"http://127.0.0.1:{cb}/robots/DEMO-9")
            if got.status_code == 200:
                robot = got.json()
                break
        assert robot is not None, "not in the read API within 1 s"
        assert (robot["battery_level"], robot["status"]) == (42, "busy")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "curl" in out and f"localhost:{edge}/api/pudu/webhook" in out
    assert proc.returncode == 0, out
