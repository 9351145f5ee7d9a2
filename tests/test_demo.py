"""`make run`'s pipeline: a webhook shows up in the read API within a second."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.procs import free_port, wait_for_port
from tests.support.waiting import eventually


def test_make_run_pipeline_answers_within_a_second(tmp_path: Path) -> None:
    seen: list[str] = []
    edge, admin, cb, mqtt = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "EDGE_HTTP_PORT": str(edge), "EDGE_ADMIN_PORT": str(admin),
           "CALLBACK_HTTP_PORT": str(cb), "DEMO_MQTT_PORT": str(mqtt),
           "OUTBOX_PATH": str(tmp_path / "outbox.db"), "DEMO_KEYS_FILE": str(tmp_path / "k.yaml"),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'callback.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "demo"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port("127.0.0.1", cb, timeout=20)
        wait_for_port("127.0.0.1", edge, timeout=20)
        # The banner is printed once every listener is up; the key is on its first line.
        assert proc.stdout is not None
        while "admin key" not in (line := proc.stdout.readline()):
            assert line, "demo exited"
            seen.append(line)
        auth = {"Authorization": f"Bearer {line.split(':', 1)[1].strip()}"}
        body = {"callback_type": "notifyRobotStatus",
                "data": {"sn": "DEMO-9", "battery": 42, "run_state": "BUSY",
                         "timestamp": 1700000000}}
        r = httpx.post(f"http://127.0.0.1:{edge}/api/pudu/webhook", json=body,
                       headers={"CallbackCode": "demo-callback-code"})
        assert r.status_code == 200, r.text
        robot = eventually(lambda: httpx.get(f"http://127.0.0.1:{cb}/robots/DEMO-9", headers=auth),
                           accept=lambda got: got.status_code == 200, within=1.0,
                           what="DEMO-9 in the read API").json()
        assert (robot["battery_level"], robot["status"]) == (42, "busy")
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.stdout is not None
    with proc.stdout:
        out = "".join(seen) + proc.stdout.read()  # not communicate(): skips what is buffered
    assert "curl" in out and f"localhost:{edge}/api/pudu/webhook" in out
    assert proc.returncode == 0, out


def _printed_curls(lines: list[str]) -> list[str]:
    """The banner's curl commands, each joined across its ``\\`` continuation lines."""
    commands: list[str] = []
    current: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("curl ") or current:
            current.append(stripped.removesuffix("\\").strip())
            if not stripped.endswith("\\"):
                commands.append(" ".join(current))
                current = []
    return commands


def test_make_run_prints_a_key_its_curl_lines_work_with(tmp_path: Path) -> None:
    edge, admin, cb, mqtt = free_port(), free_port(), free_port(), free_port()
    keys = tmp_path / "demo-keys.yaml"
    env = {**os.environ, "EDGE_HTTP_PORT": str(edge), "EDGE_ADMIN_PORT": str(admin),
           "CALLBACK_HTTP_PORT": str(cb), "DEMO_MQTT_PORT": str(mqtt),
           "OUTBOX_PATH": str(tmp_path / "outbox.db"), "DEMO_KEYS_FILE": str(keys),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'callback.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "demo"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not lines or "Ctrl-C" not in lines[-1]:
            line = proc.stdout.readline()
            assert line, "demo exited: " + "".join(lines)
            lines.append(line)
        key = next(ln.split(":", 1)[1].strip() for ln in lines if "admin key" in ln)
        assert key and key not in keys.read_text()  # only its hash is kept
        assert keys.stat().st_mode & 0o777 == 0o600
        curls = _printed_curls(lines)
        assert len(curls) >= 6 and all("curl" in c for c in curls)
        for command in curls:
            assert "Bearer" not in command or key in command
            with_code = command.replace("curl -s", "curl -s -w '\\n%{http_code}'", 1)
            curl = functools.partial(subprocess.run, ["bash", "-c", with_code],
                                     capture_output=True, text=True, timeout=15)
            eventually(curl, within=10, what=f"200 from {command}",  # robot, gateway: a moment
                       accept=lambda done: done.stdout.rsplit("\n", 1)[-1] == "200")
        # Without the key the read API refuses, saying so.
        assert httpx.get(f"http://127.0.0.1:{cb}/robots").status_code == 401
        listed = httpx.get(f"http://127.0.0.1:{cb}/robots",
                           headers={"Authorization": f"Bearer {key}"}).json()
        assert [r["robot_sn"] for r in listed["items"]] == ["DEMO-1"]
        assert listed["next_cursor"] is None
        # the sample robot is dated now (not 2023: "stale for 1,115 days" in the console)
        assert abs(listed["items"][0]["last_ts"] - time.time()) < 60, listed
        # the banner names the console, and that address serves its sign-in page
        url = f"http://localhost:{cb}/"
        assert any(ln.startswith(f"Console: {url} ") for ln in lines), lines
        page = httpx.get(url.replace("localhost", "127.0.0.1"))
        assert page.status_code == 200 and 'type="password"' in page.text
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stdout.close()


def test_make_run_with_a_port_taken_says_so_in_one_line_and_exits_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cb = taken.getsockname()[1]
        env = {**os.environ, "EDGE_HTTP_PORT": str(free_port()),
               "EDGE_ADMIN_PORT": str(free_port()), "CALLBACK_HTTP_PORT": str(cb),
               "DEMO_MQTT_PORT": str(free_port()), "OUTBOX_PATH": str(tmp_path / "outbox.db"),
               "DEMO_KEYS_FILE": str(tmp_path / "k.yaml"),
               "DATABASE_URL": f"sqlite:///{tmp_path / 'callback.db'}"}
        done = subprocess.run([sys.executable, "-m", "demo"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"cannot listen on 0.0.0.0:{cb}" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "admin key" not in done.stdout and "curl" not in done.stdout  # no banner
