"""The console under a moving fleet: ``python -m bench.console_live [--robots N] [--seconds T]``.

A callback server (SQLite, Mosquitto on 127.0.0.1:1883) is fed pose envelopes over MQTT
directly (no edge agent: the cores are left to the browser and the server), every robot
once a second; Debian's headless chromium signs in and watches. Prints one JSON line:
page-ready time (sign-in click to every robot in the table), frames and objects the page
received per second, the page's time spent rendering, and the server's CPU per update
(``--baseline``: the same feed with nobody watching, for the console's share of it).
Not part of ``make bench``: it needs chromium and a free Mosquitto, and takes ~1 min.

``--mix 164`` drives the realistic mix through real webhooks and edge agents instead and
reports long tasks, click latency, DOM nodes and page memory, in total and ``over_time``
(ten equal spans); ``--long`` runs it 10 minutes (default ``--seconds``, 20), ``--profile``
adds the page's functions by their own CPU time, ``--trace`` the main thread's time by the
browser's own steps (script, style, layout, paint, compositing, collection), in every task
and inside the long tasks, and the size of the largest layouts.

Beside the page's long tasks, a stall probe (another process asking for 5 ms sleeps) counts
the times a waking process waited 45 ms or more for a core, and how many of the page's long
tasks overlap one: a machine so loaded that a task of a few milliseconds takes 50
wall-clock ms shows there. It does not see a busy thread's share of the cores shrinking
(the scheduler favours a process that mostly sleeps), so no stall does not prove a long
task is the page's own work.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
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
from tests.support.services import callback_server, edge_agent

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


def _stats(driver: webdriver.Chrome) -> dict[str, Any]:
    """The page's counters, read from its ES module (the page sets no globals)."""
    stats: dict[str, Any] = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/console/static/console.js').then((m) => done({...m.stats}));")
    return stats


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
            before = _stats(driver)
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
            after = _stats(driver)
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


# Measured inside the page (added before any page script through the DevTools protocol, so
# the strict CSP is untouched): every long task (> 50 ms) the browser reports.
_OBSERVE = """
window.__long = [];
window.__quiet = [];
new PerformanceObserver((l) => {
  for (const e of l.getEntries()) {
    window.__long.push([performance.timeOrigin + e.startTime, e.duration]);
  }
}).observe({type: "longtask", buffered: true});
"""
# The stall probe: one line "<epoch start s> <ms late>" per 5 ms sleep that woke 45 ms late
# or more (the process itself waited for a core that long).
_PROBE = """
import time
while True:
    t = time.time()
    time.sleep(0.005)
    late = time.time() - t - 0.005
    if late >= 0.045:
        print(f"{t:.3f} {late * 1000:.0f}", flush=True)
"""


class _StallProbe:
    """The probe process, its lines collected by a thread until ``stop``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE,
                                     text=True)
        self.stalls: list[tuple[float, float]] = []  # (epoch start s, ms)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            start, ms = line.split()
            self.stalls.append((float(start), float(ms)))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join(5)

    def since(self, epoch: float) -> list[tuple[float, float]]:
        return [s for s in self.stalls if s[0] >= epoch]

    def overlapping(self, tasks: list[tuple[float, float]]) -> int:
        """How many of ``tasks`` (epoch start ms, ms) overlap a stall."""
        return sum(any(s * 1000 <= t + ms and t <= s * 1000 + sms for s, sms in self.stalls)
                   for t, ms in tasks)


# The long tasks since the last call ([epoch start ms, ms]), as [the page's, the bench's
# own]: a task overlapping a window in which the bench forced a garbage collection
# (``_page``, for the heap figure) is the bench's, not the page's.
_TAKE = """
const page = [], bench = [];
for (const [start, ms] of window.__long.splice(0)) {
  const ours = window.__quiet.some(([a, b]) => start <= b && start + ms >= a);
  (ours ? bench : page).push([start, ms]);
}
window.__quiet = window.__quiet.filter(([, b]) => b > Date.now() - 60000);
return [page, bench];
"""
# One click on a sort header, answered when the next frame after it is painted.
_CLICK = """
const done = arguments[arguments.length - 1];
const th = document.querySelector('#robots th[data-key="' + arguments[0] + '"]');
const t0 = performance.now();
th.click();
requestAnimationFrame(() => setTimeout(() => done(performance.now() - t0), 0));
"""
_MIX = (("pose", 0.45), ("status", 0.2), ("power", 0.2), ("move", 0.05), ("event", 0.1))
#: Sites (a gateway each) as the issue's operator has them: 1,000 robots across 10.
GATEWAYS = 10
ORGS = 3  # the sites' orgs: site g is org{g % ORGS}'s gateway gw{g}


def _webhook(kind: str, sn: str, tick: int) -> dict[str, Any]:
    """One Pudu webhook body of the realistic mix: faults, stuck robots, low batteries,
    not only poses. A pose webhook carries no map (docs/pudu.md): the map name comes with a
    robotErrorNotice's ``extend_info`` ("map", every robot once before the page opens, on
    a map called "1F" at every site)."""
    n, now = int(sn[1:]), int(time.time())
    if kind in ("pose", "map"):
        angle = (tick * 5 + n) % 360
        pose = {"x": round(20 * math.cos(math.radians(angle)) + n % 10, 2),
                "y": round(20 * math.sin(math.radians(angle)), 2), "yaw": float(angle)}
        if kind == "map":
            return {"callback_type": "robotErrorNotice",
                    "data": {"sn": sn, "timestamp": now, "error_level": "Event",
                             "error_type": "MapInfo", "error_detail": "bench",
                             "error_id": f"m{tick}-{sn}",
                             "extend_info": {"map_name": "1F", "position": pose}}}
        return {"callback_type": "notifyRobotPose", "data": {"sn": sn, "timestamp": now, **pose}}
    if kind == "move":  # one robot in 30 stuck; robot_stuck opens after for_seconds of it
        state = "STUCK" if n % 30 == 0 else ("MOVING" if tick % 2 else "IDLE")
        return {"callback_type": "notifyRobotMoveState",
                "data": {"sn": sn, "timestamp": now, "state": state}}
    if kind == "status":
        status = "OFFLINE" if n % 50 == 0 else "WORKING" if n % 3 else "ONLINE"
        return {"callback_type": "robotStatus",
                "data": {"sn": sn, "timestamp": now, "run_status": status}}
    if kind == "power":
        level = 8 if n % 25 == 0 else 30 + (n * 7 + tick) % 70
        return {"callback_type": "notifyRobotPower",
                "data": {"sn": sn, "timestamp": now, "power": level, "charge_stage": "IDLE"}}
    severity = "Fatal" if n % 40 == 0 else "Warning"
    return {"callback_type": "robotErrorWarning",
            "data": {"sn": sn, "timestamp": now, "error_level": severity, "error_type": "Crash",
                     "error_detail": "bench", "error_id": f"e{tick}-{sn}"}}


def _spread(samples: list[dict[str, Any]], key: str) -> list[float] | None:
    values = [s[key] for s in samples]
    return [values[0], max(values), values[-1]] if values else None


def _self_times(profile: dict[str, Any], top: int = 12) -> list[tuple[str, float]]:
    """The page's functions by their own (self) time in a DevTools CPU profile, in ms."""
    nodes = {n["id"]: n for n in profile["nodes"]}
    deltas = profile.get("timeDeltas", [])
    spent: dict[str, float] = {}
    for sample, delta in zip(profile.get("samples", []), [*deltas[1:], 0], strict=False):
        frame = nodes[sample]["callFrame"]
        name = f"{frame['functionName'] or '(anonymous)'} {frame['url'].rsplit('/', 1)[-1]}" \
               f":{frame['lineNumber'] + 1}".strip()
        spent[name] = spent.get(name, 0.0) + delta / 1000
    return [(k, round(v, 1)) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])[:top]]


# The renderer's timeline, read through chromedriver's performance log.
_TRACE_CATEGORIES = "devtools.timeline,disabled-by-default-devtools.timeline,v8"


class _Trace:
    """Where the renderer main thread's time goes, from trace events as they come: each of
    the browser's own steps (its events' self times) in every task and in the long tasks,
    and how many of the page's objects each layout redid. A long task mostly spent
    collecting garbage is counted apart: the bench forces a collection every 5 s."""

    def __init__(self) -> None:
        self.events: dict[int, list[dict[str, Any]]] = {}  # tid -> complete events
        self.by_step: dict[str, float] = {}  # inside the long tasks
        self.all_steps: dict[str, float] = {}  # inside every task
        self.busy_ms = 0.0
        self.layouts: list[tuple[float, int | None, int | None]] = []  # (ms, dirty, total)
        self.tasks: list[dict[str, Any]] = []
        self.collections = 0

    def take(self, driver: webdriver.Chrome) -> None:
        for entry in driver.get_log("performance"):  # type: ignore[no-untyped-call]
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") != "Tracing.dataCollected":
                continue
            e = msg["params"]
            if e.get("ph") == "X" and "dur" in e:
                self.events.setdefault(e["tid"], []).append(e)
        self._digest()

    def _digest(self) -> None:
        # the renderer's main thread: the one that lays out
        main = max(self.events, key=lambda t: sum(e["name"] == "Layout" for e in self.events[t]),
                   default=None)
        if main is None:
            return
        events = sorted(self.events.pop(main), key=lambda e: (e["ts"], -e["dur"]))
        self.events.clear()
        task: dict[str, Any] | None = None
        inner: list[dict[str, Any]] = []
        for e in [*events, {"name": "RunTask", "ts": float("inf"), "dur": 0}]:
            if task is not None and e["ts"] < task["ts"] + task["dur"]:
                inner.append(e)
                continue
            if task is not None:
                self._count(task, inner)
            task, inner = (e, []) if e["name"] == "RunTask" else (None, [])

    def _count(self, task: dict[str, Any], inner: list[dict[str, Any]]) -> None:
        for e in inner:  # a layout's size: how many of the page's objects it redid
            if e["name"] == "Layout":
                begin = e.get("args", {}).get("beginData", {})
                self.layouts.append((e["dur"] / 1000, begin.get("dirtyObjects"),
                                     begin.get("totalObjects")))
        steps = _self_times_of(task, inner)
        self.busy_ms += task["dur"] / 1000
        for name, ms in steps.items():
            self.all_steps[name] = self.all_steps.get(name, 0.0) + ms
        if task["dur"] <= 50_000:
            return
        if sum(ms for name, ms in steps.items() if name.startswith("V8.GC")) > task["dur"] / 2000:
            self.collections += 1
            return
        for name, ms in steps.items():
            self.by_step[name] = self.by_step.get(name, 0.0) + ms
        self.tasks.append({"ms": round(task["dur"] / 1000, 1), "steps": {
            k: round(v, 1) for k, v in sorted(steps.items(), key=lambda kv: -kv[1])[:6]}})

    def summary(self, seconds: float) -> dict[str, Any]:
        def share(steps: dict[str, float]) -> dict[str, float]:
            total = sum(steps.values()) or 1.0
            return {k: round(v / total, 3)
                    for k, v in sorted(steps.items(), key=lambda kv: -kv[1])[:10]}

        return {"main_thread_busy_ms_per_s": round(self.busy_ms / seconds, 1),
                "busy_ms_per_s_by_step": {k: round(v / seconds, 1) for k, v in sorted(
                    self.all_steps.items(), key=lambda kv: -kv[1])[:10]},
                "layouts_over_8ms": sum(ms > 8 for ms, _, _ in self.layouts),
                "largest_layouts_ms_dirty_total": [
                    [round(ms, 1), dirty, total] for ms, dirty, total in sorted(
                        self.layouts, key=lambda t: -t[0])[:3]],
                "long_tasks_traced": len(self.tasks),
                "long_tasks_mostly_collection": self.collections,
                "long_task_share_by_step": share(self.by_step),
                "longest": sorted(self.tasks, key=lambda t: -t["ms"])[:5]}


def _self_times_of(task: dict[str, Any], inner: list[dict[str, Any]]) -> dict[str, float]:
    """Each event's own time (less its children's) inside ``task``, in ms by event name."""
    spent: dict[str, float] = {}
    stack: list[tuple[dict[str, Any], float]] = [(task, 0.0)]  # (event, its children's us)

    def close(until: float) -> None:
        while len(stack) > 1 and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= until:
            e, children = stack.pop()
            spent[e["name"]] = spent.get(e["name"], 0.0) + (e["dur"] - children) / 1000
            parent, theirs = stack[-1]
            stack[-1] = (parent, theirs + e["dur"])

    for e in inner:
        close(e["ts"])
        stack.append((e, 0.0))
    close(float("inf"))
    e, children = stack[0]
    spent["(task itself)"] = spent.get("(task itself)", 0.0) + (e["dur"] - children) / 1000
    return spent


def run_mix(robots: int, seconds: int, rate: int, gateways: int = GATEWAYS,
            profile: bool = False, trace: bool = False) -> dict[str, Any]:
    """The realistic mix through real webhooks and edge agents (a site each, in ``ORGS``
    orgs), one gateway stopped a third in."""
    import random
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    keys_file = tmp / "keys.yaml"
    key = add_key(keys_file, "watcher", ["*"], "operator")
    prefix = f"b{uuid.uuid4().hex[:8]}"
    rnd = random.Random(29)
    with ExitStack() as stack:
        server = stack.enter_context(callback_server(
            tmp, BROKER, f"sqlite:///{tmp / 'cb.db'}", TOPIC_PREFIX=prefix,
            API_KEYS_FILE=str(keys_file)))
        agents = [stack.enter_context(edge_agent(tmp, BROKER, org=f"org{g % ORGS}",
                                                 gateway=f"gw{g}", TOPIC_PREFIX=prefix))
                  for g in range(gateways)]
        http = stack.enter_context(httpx.Client(headers={"CallbackCode": "test-code"},
                                                timeout=10))
        sns = [f"R{i:05d}" for i in range(robots)]

        per_site = max(1, math.ceil(robots / gateways))

        def post(sn: str, kind: str, tick: int) -> None:
            # a site holds a run of sns, so the mix's faulted, stuck, offline and low robots
            # (every 40th, 30th, 50th, 25th sn) are spread over the sites, not all on one
            agent = agents[int(sn[1:]) // per_site % gateways]
            if agent.proc is not None and agent.proc.poll() is None:
                http.post(agent.url + "/api/pudu/webhook", json=_webhook(kind, sn, tick))

        for sn in sns:  # every robot known, on its site's map, before the page opens
            post(sn, "status", 0)
            post(sn, "map", 0)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--window-size=1440,1000", "--enable-precise-memory-info"):
            options.add_argument(arg)
        tracer = _Trace() if trace else None
        if trace:
            options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
            options.add_experimental_option("perfLoggingPrefs", {
                "enableNetwork": False, "enablePage": False,
                "traceCategories": _TRACE_CATEGORIES})
        driver = webdriver.Chrome(service=ChromeService("/usr/bin/chromedriver"),
                                  options=options)
        stack.callback(driver.quit)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _OBSERVE})
        driver.execute_cdp_cmd("Performance.enable", {})
        driver.get(server.url + "/")
        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.ID, "signin-button").click()
        deadline = time.monotonic() + 120
        while not (driver.find_elements(By.ID, "total")
                   and driver.find_element(By.ID, "total").text.endswith(f"of {robots})")):
            assert time.monotonic() < deadline, "page never showed every robot"
            time.sleep(0.2)

        samples: list[dict[str, Any]] = []
        long_tasks: list[tuple[float, float]] = []  # (epoch start ms, ms)
        probe = _StallProbe()
        stack.callback(probe.stop)
        steady_from = time.time()
        driver.set_script_timeout(30)
        pool = stack.enter_context(ThreadPoolExecutor(8))  # a second's webhooks at once
        t0, sent, warm = time.monotonic(), 0, max(5, min(60, seconds // 6))
        for tick in range(1, seconds + 1):
            if time.monotonic() - t0 <= tick:  # behind (a busy machine): this second skipped
                batch = [(rnd.choice(sns), rnd.choices([k for k, _ in _MIX],
                                                       [w for _, w in _MIX])[0])
                         for _ in range(rate)]
                list(pool.map(lambda job, tick=tick: post(job[0], job[1], tick), batch))
                sent += rate
            if tick == seconds // 3 and agents[-1].proc is not None:
                agents[-1].kill()  # one gateway stops: its robots become unknown
            if tick == warm:
                driver.execute_script("window.__long = []")
                steady_from = time.time()
                if tracer is not None:
                    driver.get_log("performance")  # type: ignore[no-untyped-call]
                if profile:
                    driver.execute_cdp_cmd("Profiler.enable", {})
                    driver.execute_cdp_cmd("Profiler.start", {})
            if tick > warm and tick % 5 == 0:
                click = driver.execute_async_script(_CLICK, "battery_level")
                longs, ours = driver.execute_script(_TAKE)
                long_tasks += longs
                samples.append({"t": tick, "click_ms": click, "long_tasks": len(longs),
                                "long_max_ms": max((ms for _, ms in longs), default=0),
                                "bench_gc_long": [ms for _, ms in ours],
                                **_page(driver)})
                if tracer is not None:
                    tracer.take(driver)
            time.sleep(max(0.0, t0 + tick - time.monotonic()))
        elapsed = time.monotonic() - t0
        if tracer is not None:
            tracer.take(driver)
        longs, ours = driver.execute_script(_TAKE)
        long_tasks += longs
        forced = [ms for s in samples for ms in s["bench_gc_long"]] + [ms for _, ms in ours]
        stalls = probe.since(steady_from)
        during_stall = probe.overlapping(long_tasks)
        durations = [ms for _, ms in long_tasks]
        hot = _self_times(driver.execute_cdp_cmd("Profiler.stop", {})["profile"]) \
            if profile else None
        steps = _stats(driver)["slowest"]
        driver.save_screenshot(str(tmp / "console-bench-mix.png"))
    steady = elapsed - warm
    clicks = sorted(s["click_ms"] for s in samples)
    return {
        "robots": robots, "seconds": seconds, "webhooks_sent_per_s": round(sent / elapsed, 1),
        "gateways": gateways, "orgs": min(gateways, ORGS), "gateway_stopped_at_s": seconds // 3,
        "steady_state_s": round(steady, 1),
        "long_tasks": len(durations), "long_task_max_ms": round(max(durations, default=0), 1),
        "long_task_share": round(sum(durations) / 1000 / steady, 3),
        "long_tasks_during_a_machine_stall": during_stall,
        "machine_stalls_45ms": len(stalls),
        "machine_stall_max_ms": max((ms for _, ms in stalls), default=0),
        "page_slowest_step_ms": steps,
        "bench_forced_gc_long_tasks": len(forced),
        "bench_forced_gc_max_ms": round(max(forced, default=0), 1),
        "click_ms_median": round(clicks[len(clicks) // 2], 1) if clicks else None,
        "click_ms_max": round(clicks[-1], 1) if clicks else None,
        "dom_nodes_first_max_last": _spread(samples, "dom_nodes"),
        "heap_mb_first_max_last": _spread(samples, "heap_mb"),
        "over_time": _over_time(samples),
        "screenshot": str(tmp / "console-bench-mix.png"),
        **({"self_ms_by_function": hot} if hot is not None else {}),
        **({"trace": tracer.summary(steady)} if tracer is not None else {}),
    }


def _page(driver: webdriver.Chrome) -> dict[str, Any]:
    """The page's size now: DOM nodes in the document and alive in the renderer (detached
    ones included: a leak shows there first), and the JS heap after a collection."""
    before = driver.execute_script("return performance.timeOrigin + performance.now()")
    driver.execute_cdp_cmd("HeapProfiler.collectGarbage", {})
    driver.execute_script(
        "window.__quiet.push([arguments[0], performance.timeOrigin + performance.now()])",
        before)
    metrics = driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
    used = next(m["value"] for m in metrics if m["name"] == "JSHeapUsedSize")
    counters = driver.execute_cdp_cmd("Memory.getDOMCounters", {})
    return {"dom_nodes": driver.execute_script("return document.getElementsByTagName('*').length"),
            "live_nodes": counters["nodes"], "listeners": counters["jsEventListeners"],
            "heap_mb": round(float(used) / 2**20, 1)}


def _over_time(samples: list[dict[str, Any]], rows: int = 10) -> list[dict[str, Any]]:
    """The samples in (at most) ``rows`` equal spans: long tasks, the slowest click, and the
    page's size at each span's end, so growth over a long run shows."""
    if not samples:
        return []
    per = max(1, math.ceil(len(samples) / rows))
    out = []
    for i in range(0, len(samples), per):
        span, last = samples[i:i + per], samples[min(i + per, len(samples)) - 1]
        out.append({"until_s": last["t"], "long_tasks": sum(s["long_tasks"] for s in span),
                    "long_max_ms": round(max(s["long_max_ms"] for s in span), 1),
                    "click_max_ms": round(max(s["click_ms"] for s in span), 1),
                    "dom_nodes": last["dom_nodes"], "live_nodes": last["live_nodes"],
                    "listeners": last["listeners"], "heap_mb": last["heap_mb"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--robots", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--baseline", action="store_true",
                        help="the same feed with no browser or stream: the server's own cost")
    parser.add_argument("--mix", type=int, metavar="WEBHOOKS_PER_S", default=0,
                        help="the realistic mix (statuses, powers, poses, events, faults, one "
                             "gateway stopped) through real webhooks at this rate, e.g. 164")
    parser.add_argument("--gateways", type=int, default=GATEWAYS,
                        help="with --mix: sites, a gateway (edge agent) each")
    parser.add_argument("--long", action="store_true",
                        help="with --mix: run 10 minutes (page memory and DOM over time)")
    parser.add_argument("--profile", action="store_true",
                        help="with --mix: the page's functions by their own CPU time")
    parser.add_argument("--trace", action="store_true",
                        help="with --mix: the main thread's time by the browser's steps")
    args = parser.parse_args()
    if args.mix:
        seconds = 600 if args.long else args.seconds
        print(json.dumps(run_mix(args.robots, seconds, args.mix, args.gateways,
                                 profile=args.profile, trace=args.trace)))
        return
    print(json.dumps(run(args.robots, args.seconds, watch=not args.baseline)))


if __name__ == "__main__":
    main()
