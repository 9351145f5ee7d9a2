"""The console under a moving fleet: ``python -m bench.console_live [--robots N] [--seconds T]``.

A callback server (SQLite, Mosquitto on 127.0.0.1:1883) is fed pose envelopes over MQTT
directly (no edge agent: the cores are left to the browser and the server), every robot
once a second; Debian's headless chromium signs in and watches. Prints one JSON line:
page-ready time (sign-in click to every robot in the table), frames and objects the page
received per second, the page's time spent rendering, and the server's CPU per update
(``--baseline``: the same feed with nobody watching, for the console's share of it).
Not part of ``make bench``: it needs chromium and a free Mosquitto, and takes ~1 min.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By

from bench.procs import cpu_seconds
from bridge.envelope import Envelope
from callback_server.console import KINDS
from callback_server.keys import add_key
from tests.services import callback_server

BROKER = "mqtt://127.0.0.1:1883"


def _poses(prefix: str, robots: int, tick: int) -> list[tuple[str, bytes]]:
    out = []
    now = time.time()
    for i in range(robots):
        sn, org = f"R{i:05d}", f"org{i % 4}"
        angle = (tick * 5 + i) % 360
        data = {"x": round(20 * math.cos(math.radians(angle)) + i % 10, 2),
                "y": round(20 * math.sin(math.radians(angle)) + i // 100, 2),
                "yaw": float(angle), "map_name": f"floor{i % 4}"}
        env = Envelope(id=f"p{tick}-{sn}", type="notifyRobotPose", org=org, device=sn,
                       gateway=f"gw-{org}", ts=now, received_at=now, data=data,
                       raw=dict(data), channel="pose")
        out.append((f"{prefix}/org/{org}/device/{sn}/pose", env.to_json()))
    return out


class _Reader(threading.Thread):
    """A plain SSE client beside the browser: what the server sends when read at once."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.frames = self.objects = 0
        self.stop = False

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.stream("GET", self.url + "/console/stream", headers=headers,
                          timeout=None) as r:
            event = ""
            for line in r.iter_lines():
                if self.stop:
                    return
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event in KINDS:
                    self.frames += 1
                    self.objects += len(json.loads(line[6:]))


def run(robots: int, seconds: int, watch: bool = True) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    keys_file = tmp / "keys.yaml"
    key = add_key(keys_file, "watcher", ["*"], "viewer")
    prefix = f"b{uuid.uuid4().hex[:8]}"
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{prefix}")
    pub.connect("127.0.0.1", 1883)
    pub.loop_start()
    with callback_server(tmp, BROKER, f"sqlite:///{tmp / 'cb.db'}", TOPIC_PREFIX=prefix,
                         API_KEYS_FILE=str(keys_file)) as server:
        assert server.proc is not None
        for topic, payload in _poses(prefix, robots, 0):
            pub.publish(topic, payload, qos=1)
        last = f"{server.url}/robots/R{robots - 1:05d}"
        deadline = time.monotonic() + 60
        while httpx.get(last, headers=server.auth).status_code != 200:
            assert time.monotonic() < deadline, "seed not stored"
            time.sleep(0.2)
        if not watch:  # the baseline: the same feed, nobody watching
            cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
            for tick in range(1, seconds + 1):
                for topic, payload in _poses(prefix, robots, tick):
                    pub.publish(topic, payload, qos=1)
                time.sleep(max(0.0, t0 + tick - time.monotonic()))
            time.sleep(1.0)
            cpu, elapsed = cpu_seconds(server.proc.pid) - cpu0, time.monotonic() - t0
            pub.loop_stop()
            return {"robots": robots, "seconds": seconds, "watching": False,
                    "server_cpu_ms_per_update": round(cpu * 1000 / (robots * seconds), 3),
                    "server_cpu_share": round(cpu / elapsed, 3)}
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--window-size=1400,1000"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=ChromeService("/usr/bin/chromedriver"),
                                  options=options)
        try:
            driver.get(server.url + "/")
            driver.find_element(By.ID, "key").send_keys(key)
            started = time.monotonic()
            driver.find_element(By.ID, "signin-button").click()
            want = f"({robots} shown of {robots})"
            while True:
                found = driver.find_elements(By.ID, "total")
                if found and found[0].text == want:
                    break
                assert time.monotonic() - started < 60, "page never showed every robot"
                time.sleep(0.02)
            ready = time.monotonic() - started
            before = driver.execute_script("return {...window.consoleStats}")
            reader = _Reader(server.url, key)
            reader.start()
            time.sleep(1.0)
            reader.frames = reader.objects = 0
            cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
            for tick in range(1, seconds + 1):
                for topic, payload in _poses(prefix, robots, tick):
                    pub.publish(topic, payload, qos=1)
                time.sleep(max(0.0, t0 + tick - time.monotonic()))
            time.sleep(1.0)  # the last second's frames
            elapsed = time.monotonic() - t0
            cpu = cpu_seconds(server.proc.pid) - cpu0
            after = driver.execute_script("return {...window.consoleStats}")
            reader.stop = True
            driver.save_screenshot(str(tmp / "console-bench.png"))
        finally:
            driver.quit()
    pub.loop_stop()
    updates = robots * seconds
    renders = after["renders"] - before["renders"]
    return {
        "robots": robots, "seconds": seconds, "page_ready_s": round(ready, 2),
        "frames_per_s": round((after["frames"] - before["frames"]) / elapsed, 2),
        "objects_per_s": round((after["objects"] - before["objects"]) / elapsed, 1),
        "plain_client_frames_per_s": round(reader.frames / elapsed, 2),
        "plain_client_objects_per_s": round(reader.objects / elapsed, 1),
        "renders_per_s": round(renders / elapsed, 2),
        "render_ms_each": round((after["renderMs"] - before["renderMs"]) / max(renders, 1), 1),
        "floor_ms_each": round((after["floorMs"] - before["floorMs"]) / max(renders, 1), 1),
        "server_cpu_ms_per_update": round(cpu * 1000 / updates, 3),
        "server_cpu_share": round(cpu / elapsed, 3),
        "screenshot": str(tmp / "console-bench.png"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--robots", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--baseline", action="store_true",
                        help="the same feed with no browser or stream: the server's own cost")
    args = parser.parse_args()
    print(json.dumps(run(args.robots, args.seconds, watch=not args.baseline)))


if __name__ == "__main__":
    main()
