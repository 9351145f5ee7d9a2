"""The fleet console in a real browser: Debian's chromium driven by Selenium, against a
running callback server fed through running edge agents by real Pudu webhooks.

Screenshots go to ``test-output/console/`` at the repository root (git-ignored), where
they can be looked at after a run.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from callback_server.keys import Role, add_key
from tests.support.mqtt_probe import publish_once
from tests.support.services import ServiceProcess, callback_server, edge_agent
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
HEADERS = {"CallbackCode": "test-code"}
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "console"
T = TypeVar("T")


def on_page(check: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """on_page() for a page: an element re-rendered between find and read is tried
    again, and the page is asked ten times a second."""
    return eventually(check, what=what, within=timeout,
                      ignoring=(StaleElementReferenceException,), every=0.1)


@dataclass
class Fleet:
    server: ServiceProcess
    agents: dict[str, ServiceProcess]  # org -> its gateway's edge agent
    keys: dict[str, str]
    tmp: Path

    def post(self, org: str, callback_type: str, **data: Any) -> None:
        body = {"callback_type": callback_type,
                "data": {"timestamp": int(time.time()), **data}}
        r = httpx.post(self.agents[org].url + "/api/pudu/webhook", json=body,
                       headers=HEADERS, timeout=10)
        assert r.status_code == 200, r.text

    def robot(self, sn: str) -> dict[str, Any] | None:
        r = httpx.get(f"{self.server.url}/robots/{sn}", headers=self.server.auth, timeout=5)
        return r.json() if r.status_code == 200 else None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("console")
    keys_file = tmp / "keys.yaml"
    roles: list[tuple[str, Role]] = [("viewer_a", "viewer"), ("operator_a", "operator"),
                                      ("ingest_a", "ingest")]
    keys = {name: add_key(keys_file, name, ["acme"], role) for name, role in roles}
    p = f"t{uuid.uuid4().hex[:8]}"
    agent_config = tmp / "edge.yaml"
    agent_config.write_text("heartbeat_seconds: 1\n")  # the gateways view shows them
    agent = {"TOPIC_PREFIX": p, "EDGE_AGENT_CONFIG": str(agent_config)}
    # robot commands go to a Pudu cloud nobody answers here: the page shows the timeout
    with callback_server(tmp, BROKER, f"sqlite:///{tmp / 'cb.db'}", TOPIC_PREFIX=p,
                         API_KEYS_FILE=str(keys_file), COMMAND_TIMEOUT_MAX="2") as server, \
            edge_agent(tmp, BROKER, org="acme", gateway="gw-acme", **agent) as a, \
            edge_agent(tmp, BROKER, org="beta", gateway="gw-beta", **agent) as b:
        yield Fleet(server, {"acme": a, "beta": b}, keys, tmp)


@pytest.fixture
def browser() -> Iterator[Callable[[], WebDriver]]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    drivers: list[WebDriver] = []

    def open_browser() -> WebDriver:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--window-size=1400,1100", "--disable-gpu"):
            options.add_argument(arg)
        # The driver's path given: Selenium Manager is not run, nothing is downloaded.
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                                  options=options)
        drivers.append(driver)
        return driver

    yield open_browser
    for driver in drivers:
        driver.quit()


def sign_in(driver: WebDriver, fleet: Fleet, key_name: str) -> None:
    driver.get(fleet.server.url + "/")
    field = driver.find_element(By.ID, "key")
    assert field.get_attribute("type") == "password"
    field.send_keys(fleet.keys[key_name])
    shot(driver, fleet, f"signin-{key_name}")
    driver.find_element(By.ID, "signin-button").click()
    on_page(lambda: driver.find_elements(By.CSS_SELECTOR, "#link.up"), "stream up")


def page_stats(driver: WebDriver) -> dict[str, Any]:
    """The page's counters (frames, renders, ready): read from its module, not a global."""
    stats: dict[str, Any] = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/console/static/console.js')"
        ".then((m) => done({...m.stats}), (e) => done({error: String(e)}));")
    assert "error" not in stats, stats
    return stats


def cell(driver: WebDriver, sn: str, cls: str) -> str | None:
    found = driver.find_elements(By.CSS_SELECTOR, f'#robots tr[data-sn="{sn}"] td.{cls}')
    return found[0].text if found else None


def alert_row(driver: WebDriver, sn: str, rule: str = "robot_fault") -> Any:
    for row in driver.find_elements(By.CSS_SELECTOR, f'#alerts tbody tr[data-rule="{rule}"]'):
        if row.find_element(By.CSS_SELECTOR, "td.subject").text == f"robot {sn}":
            return row
    return None


def shot(driver: WebDriver, fleet: Fleet, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def event_row(driver: WebDriver, sn: str, event_id: str) -> Any:
    found = driver.find_elements(By.CSS_SELECTOR, f'#events tr[data-event="{sn}/{event_id}"]')
    return found[0] if found else None


def test_viewer_sees_its_org_live_and_operator_acknowledges(
        fleet: Fleet, browser: Callable[[], WebDriver]) -> None:
    sa, sb = f"A{uuid.uuid4().hex[:6]}", f"B{uuid.uuid4().hex[:6]}"
    fleet.post("acme", "robotStatus", sn=sa, run_status="ONLINE")
    fleet.post("acme", "notifyRobotPower", sn=sa, power=64, charge_stage="IDLE")
    fleet.post("acme", "notifyRobotPose", sn=sa, x=1.0, y=2.0, yaw=0.0)
    fleet.post("beta", "robotStatus", sn=sb, run_status="ONLINE")
    on_page(lambda: fleet.robot(sb) and fleet.robot(sa), "both robots stored")

    viewer = browser()
    sign_in(viewer, fleet, "viewer_a")
    assert viewer.get_cookie("console_session") is not None
    assert fleet.keys["viewer_a"] not in str(viewer.get_cookies())
    on_page(lambda: cell(viewer, sa, "pos") == "1.0, 2.0 ∠0°", "first pose shown")
    assert cell(viewer, sa, "status") == "online" and cell(viewer, sa, "org") == "acme"
    assert "64 %" in (cell(viewer, sa, "battery") or "")
    viewer.execute_script("window.__notReloaded = true")
    # ES modules only: every script a module, nothing of the page's left on window
    assert viewer.execute_script(
        "return [...document.scripts].every((s) => s.type === 'module') && "
        "['consoleStats', 'robotPage', 'sendCommand', 'eventRow'].every((k) => !(k in window))")
    marker = f'#floor g.marker[data-sn="{sa}"]'
    # the floor is redrawn at most once a second: its marker may follow the table
    drawn = on_page(lambda: viewer.find_elements(By.CSS_SELECTOR, marker), "marker drawn")[0]
    dot = f"{marker} circle"
    before = viewer.find_element(By.CSS_SELECTOR, dot).get_attribute("cx")

    # -- a new pose moves the marker, a status change shows, without a reload ------------
    fleet.post("acme", "notifyRobotPose", sn=sa, x=6.5, y=-3.0, yaw=90.0)
    fleet.post("acme", "robotStatus", sn=sa, run_status="OFFLINE")
    on_page(lambda: cell(viewer, sa, "pos") == "6.5, -3.0 ∠90°", "pose updated live")
    on_page(lambda: cell(viewer, sa, "status") == "offline", "status updated live")
    def moved() -> str | None:
        now = viewer.find_element(By.CSS_SELECTOR, dot).get_attribute("cx")
        return now if now != before else None

    on_page(moved, "marker moved")
    # yaw 90 points up the screen: the heading line goes from the dot straight up
    circle = viewer.find_element(By.CSS_SELECTOR, dot)
    line = viewer.find_element(By.CSS_SELECTOR, f"{marker} line.heading")
    x, y = (float(circle.get_attribute(k) or "nan") for k in ("cx", "cy"))
    x2, y2 = (float(line.get_attribute(k) or "nan") for k in ("x2", "y2"))
    assert abs(x2 - x) < 0.2 and abs((y - y2) - 14) < 0.2
    # moved in place: the same marker, not a redrawn floor
    assert viewer.find_element(By.CSS_SELECTOR, marker) == drawn
    assert viewer.execute_script("return window.__notReloaded") is True

    # -- a Fatal fault opens an alert the viewer sees, with no button to act on it -------
    fleet.post("acme", "robotErrorWarning", sn=sa, error_level="Fatal", error_type="Crash",
               error_detail="motor", error_id=f"f{sa}")
    row = on_page(lambda: alert_row(viewer, sa), "alert shown live", timeout=30)
    assert row.find_element(By.CSS_SELECTOR, "td.state").text == "open"
    assert row.find_element(By.CSS_SELECTOR, "td.severity").text == "critical"
    event = on_page(lambda: event_row(viewer, sa, f"f{sa}"), "event listed live")
    assert event.find_element(By.CSS_SELECTOR, "td.severity").text == "critical"
    assert "sev-critical" in (event.get_attribute("class") or "")
    assert event.find_element(By.CSS_SELECTOR, "td.detail").text == "motor"
    assert viewer.execute_script("return window.__notReloaded") is True  # live, no reload
    snapshot_frames = page_stats(viewer)["frames"]
    assert viewer.find_elements(By.CSS_SELECTOR, "button.ack, button.silence") == []
    assert not any(e.is_displayed() for e in viewer.find_elements(By.CSS_SELECTOR, ".op-only"))

    # -- org B's robot is nowhere in the page (it was stored before the page loaded) -----
    fleet.post("beta", "notifyRobotPose", sn=sb, x=3.0, y=3.0, yaw=0.0)
    on_page(lambda: (fleet.robot(sb) or {}).get("x") == 3.0, "beta pose stored")
    # A change of A committed after B's reaches the page in the same frame or a later
    # one: once it shows, any leak of B would have arrived.
    fleet.post("acme", "notifyRobotPose", sn=sa, x=7.5, y=-3.0, yaw=90.0)
    on_page(lambda: cell(viewer, sa, "pos") == "7.5, -3.0 ∠90°", "later pose shown")
    on_page(lambda: viewer.find_elements(By.CSS_SELECTOR, '#gateways tr[data-gateway]'),
               "gateways listed")
    page = viewer.page_source
    assert sb not in page and "gw-beta" not in page and "beta" not in page
    assert viewer.find_element(By.ID, "total").text == "(1 shown of 1)"
    shot(viewer, fleet, "viewer")

    # -- an operator acknowledges it; both pages show who --------------------------------
    operator = browser()
    sign_in(operator, fleet, "operator_a")
    button = on_page(lambda: (r := alert_row(operator, sa)) and r.find_elements(
        By.CSS_SELECTOR, "button.ack"), "ack button")[0]
    assert (r := alert_row(operator, sa)) and r.find_elements(By.CSS_SELECTOR, "button.silence")
    shot(operator, fleet, "operator-before-ack")
    button.click()
    on_page(lambda: (r := alert_row(operator, sa)) and
               r.find_element(By.CSS_SELECTOR, "td.acked-by").text == "operator_a",
               "operator page shows who acknowledged")
    on_page(lambda: (r := alert_row(viewer, sa)) and
               r.find_element(By.CSS_SELECTOR, "td.acked-by").text == "operator_a" and
               r.find_element(By.CSS_SELECTOR, "td.state").text == "acknowledged",
               "viewer page shows it live")
    shot(operator, fleet, "operator-after-ack")
    shot(viewer, fleet, "viewer-after-ack")
    # all of it arrived over the first stream: no reconnect (each brings a new snapshot),
    # and the viewer's page was never reloaded while frames kept coming
    for driver in (viewer, operator):
        stats = page_stats(driver)
        assert stats["hellos"] == 1, stats
    assert viewer.execute_script("return window.__notReloaded") is True
    assert page_stats(viewer)["frames"] > snapshot_frames

    # -- sign-out ends the session: the page is the sign-in page again -------------------
    operator.find_element(By.ID, "logout").click()
    on_page(lambda: operator.find_elements(By.ID, "key"), "back at sign-in")


def test_robot_page_gateways_commands_and_tracks_after_reload(
        fleet: Fleet, browser: Callable[[], WebDriver]) -> None:
    sn, t0 = f"R{uuid.uuid4().hex[:6]}", int(time.time()) - 300
    # history: a point at t0, the status change, a minute later, the charge change. Each
    # is stored before the next is sent: a batch makes one point per robot at most.
    for callback_type, ts, data in (
            ("notifyRobotPose", t0, {"x": 1.0, "y": 1.0, "yaw": 0.0}),
            ("notifyRobotPower", t0, {"power": 80, "charge_stage": "IDLE"}),
            ("robotStatus", t0 + 1, {"run_status": "ONLINE"}),
            ("notifyRobotPose", t0 + 61, {"x": 4.0, "y": 1.0, "yaw": 90.0}),
            ("notifyRobotPower", t0 + 90, {"power": 45, "charge_stage": "CHARGING"})):
        fleet.post("acme", callback_type, sn=sn, timestamp=ts, **data)
        key = next(iter(data)).replace("power", "battery_level").replace(
            "run_status", "status")
        def stored(ts: int = ts, key: str = key) -> bool:
            r = fleet.robot(sn)
            return r is not None and r["last_ts"] == ts and r[key] is not None

        on_page(stored, f"{callback_type} at {ts} stored")
    fleet.post("acme", "notifyCleanStatus", sn=sn, task_id="t-1", task_name="Lobby",
               status="RUNNING", task_time=t0, timestamp=t0 + 2)
    auth = fleet.server.auth

    def points() -> list[dict[str, Any]] | None:
        r = httpx.get(f"{fleet.server.url}/robots/{sn}/history", headers=auth, timeout=5)
        items: list[dict[str, Any]] = r.json()["items"] if r.status_code == 200 else []
        return items if len(items) == 4 else None

    history = on_page(points, "history downsampled")
    assert [p["ts"] for p in history] == [t0, t0 + 1, t0 + 61, t0 + 90]
    assert [p["battery_level"] for p in history] == [80, 80, 80, 45]

    viewer = browser()
    sign_in(viewer, fleet, "viewer_a")
    track = f'#floor polyline.track[data-sn="{sn}"]'
    # the tracks come from the history: a fresh page has them before any new pose
    line = on_page(lambda: viewer.find_elements(By.CSS_SELECTOR, track), "track seeded")[0]
    assert len((line.get_attribute("points") or "").split()) >= 2
    viewer.refresh()
    on_page(lambda: viewer.find_elements(By.CSS_SELECTOR, "#link.up"), "stream up again")
    on_page(lambda: viewer.find_elements(By.CSS_SELECTOR, track), "track kept on reload")
    viewer.execute_script("document.getElementById('floor-section').scrollIntoView()")
    shot(viewer, fleet, "viewer-floor-after-reload")
    # the robot page: the chart, and no command anywhere for a viewer
    viewer.find_element(By.CSS_SELECTOR, f'#robots tr[data-sn="{sn}"] td.sn a').click()
    chart = on_page(lambda: viewer.find_elements(By.CSS_SELECTOR, "#robot-chart svg.history"),
                       "chart drawn")[0]
    assert int(chart.get_attribute("data-points") or 0) == 4
    assert viewer.find_elements(By.CSS_SELECTOR, "#robot-chart polyline.battery-line")
    assert len(viewer.find_elements(By.CSS_SELECTOR, "#robot-chart rect.band")) == 4
    task = on_page(lambda: viewer.find_elements(
        By.CSS_SELECTOR, '#robot-tasks tr[data-task="t-1"]'), "task listed")[0]
    assert task.find_element(By.CSS_SELECTOR, "td.task").text == "Lobby"
    assert task.find_element(By.CSS_SELECTOR, "td.task-status").text == "running"
    backlog = '#gateways tr[data-gateway="acme/gw-acme"] td.backlog'
    on_page(lambda: (c := viewer.find_elements(By.CSS_SELECTOR, backlog)) and
               c[0].text == "0", "heartbeat backlog shown")
    assert not viewer.find_elements(By.CSS_SELECTOR, '#gateways tr[data-gateway^="beta/"]')
    assert viewer.find_elements(By.CSS_SELECTOR, "button.cmd, select.cmd-name, form.command") == []
    shot(viewer, fleet, "viewer-robot-page")

    # an operator gets the robot's and the gateway's commands, and sees their answers
    operator = browser()
    sign_in(operator, fleet, "operator_a")
    operator.get(f"{fleet.server.url}/#robot/{sn}")
    on_page(lambda: operator.find_elements(By.CSS_SELECTOR, "#robot-chart svg.history"),
               "operator's chart")
    names = [b.get_attribute("data-command") for b in
             operator.find_elements(By.CSS_SELECTOR, "#robot-commands button.cmd")]
    assert names == ["pudu.recharge", "pudu.switch_map", "pudu.position_reporting"]
    operator.find_element(By.CSS_SELECTOR, 'button[data-command="pudu.recharge"]').click()
    out = '#robot-commands form[data-command="pudu.recharge"] .cmd-out'
    answer = on_page(lambda: answered(operator, out, "pudu.recharge: "),
                        "robot command answered")
    # no Pudu cloud is configured on this gateway: the page shows the gateway's error
    # in plain words, one row per value; the raw JSON behind its toggle
    assert answer.startswith("pudu.recharge: the gateway answered with an error"), answer
    assert "status error" in answer and "no Pudu API key configured" in answer, answer
    assert '"status"' not in answer
    operator.find_element(By.CSS_SELECTOR, f"{out} details.raw summary").click()
    raw = operator.find_element(By.CSS_SELECTOR, f"{out} details.raw pre").text
    assert '"status": "error"' in raw, raw
    ping = '#gateways tr[data-gateway="acme/gw-acme"] button.cmd'
    on_page(lambda: operator.find_elements(By.CSS_SELECTOR, ping), "gateway command")[0].click()
    pong = on_page(lambda: answered(
        operator, '#gateways tr[data-gateway="acme/gw-acme"] .cmd-out', "ping: "),
        "ping answered")
    assert "pong yes" in pong, pong
    assert "gw-acme" in pong
    shot(operator, fleet, "operator-robot-page")


def test_a_gateway_whose_clock_is_off_is_marked(
        fleet: Fleet, browser: Callable[[], WebDriver]) -> None:
    """Each gateway's clock against this server's (its heartbeat's timestamp) and against its
    robots' (the edge's verdict); beyond the gateway_clock rule's bound it is marked."""
    prefix = fleet.server.env["TOPIC_PREFIX"]
    late = f"gw-late-{uuid.uuid4().hex[:4]}"
    driver = browser()
    sign_in(driver, fleet, "viewer_a")
    driver.get(f"{fleet.server.url}/#view/gateways")
    # a site box without NTP, an hour behind: both comparisons say so
    beat = {"timestamp": time.time() - 3600, "gateway_clock_offset_s": -3600.4,
            "outbox_depth": 0}
    publish_once(BROKER, f"{prefix}/org/acme/device/{late}/telemetry", json.dumps(beat))
    row = f'#gateways tr[data-gateway="acme/{late}"]'
    def late_clock() -> Any:
        found = driver.find_elements(By.CSS_SELECTOR, f"{row} td.clock")
        return found[0] if found and "behind" in found[0].text else None

    clock = on_page(late_clock, "the late gateway's clock shown")
    assert clock.text == "clock off: 1.0 h behind this server; 1.0 h behind its robots"
    assert "off" in (clock.get_attribute("class") or "").split()
    assert "clock-off" in (driver.find_element(By.CSS_SELECTOR, row).get_attribute("class") or "")
    shot(driver, fleet, "gateways-clock-off")
    # the running edge agent's clock is this machine's: in step, not marked
    good = '#gateways tr[data-gateway="acme/gw-acme"] td.clock'
    def good_clock() -> str | None:
        found = driver.find_elements(By.CSS_SELECTOR, good)
        return found[0].text if found else None

    text = on_page(good_clock, "gw-acme's clock shown")
    assert not text.startswith("clock off"), text
    assert "off" not in (driver.find_element(By.CSS_SELECTOR, good).get_attribute("class") or "")
    # its clock set right: the mark goes, in the same row
    before = driver.find_element(By.CSS_SELECTOR, row)
    beat = {"timestamp": time.time(), "gateway_clock_offset_s": 0.0, "outbox_depth": 0}
    publish_once(BROKER, f"{prefix}/org/acme/device/{late}/telemetry", json.dumps(beat))
    on_page(lambda: not driver.find_element(By.CSS_SELECTOR, f"{row} td.clock")
               .text.startswith("clock off"), "the mark cleared")
    assert driver.find_element(By.CSS_SELECTOR, row) == before  # refilled in place
    shot(driver, fleet, "gateways-clock-set-right")


def answered(driver: WebDriver, css: str, prefix: str) -> str | None:
    """The command output at ``css`` once it is an answer (not the waiting line)."""
    found = driver.find_elements(By.CSS_SELECTOR, css)
    text = found[0].text if found else ""
    return text if text.startswith(prefix) and "waiting" not in text else None


def own_alert(fleet: Fleet) -> str:
    """The id of an alert this test opens itself (a Fatal fault of a robot of its own)."""
    sn = f"S{uuid.uuid4().hex[:6]}"
    fleet.post("acme", "robotErrorWarning", sn=sn, error_level="Fatal", error_type="Crash",
               error_detail="motor", error_id=f"f{sn}")

    def opened() -> str | None:
        r = httpx.get(fleet.server.url + "/alerts", params={"state": "open"},
                      headers=fleet.server.auth, timeout=5)
        return next((a["id"] for a in r.json()["items"] if a["subject_id"] == sn), None)

    return on_page(opened, "alert opened")


def test_session_cookie_and_origin_rules(fleet: Fleet) -> None:
    url = fleet.server.url
    own = {"Origin": url}
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/").text.count('type="password"') == 1
        assert c.post("/console/session", json={"key": "wrong"}, headers=own).status_code == 401
        r = c.post("/console/session", json={"key": fleet.keys["ingest_a"]}, headers=own)
        assert r.status_code == 403  # an ingest key may not use the console
        r = c.post("/console/session", json={"key": fleet.keys["operator_a"]},
                   headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "console_session" not in r.headers.get("set-cookie", "")
        r = c.post("/console/session", json={"key": fleet.keys["operator_a"]}, headers=own)
        assert r.status_code == 200, r.text
        me = r.json()
        # the robot page's command forms come with who the console is signed in as
        assert [c["name"] for c in me.pop("robot_commands")] == \
            ["pudu.recharge", "pudu.switch_map", "pudu.position_reporting"]
        assert me == {"name": "operator_a", "orgs": ["acme"], "role": "operator",
                      "operator": True}
        cookie = r.headers["set-cookie"]
        session_id = c.cookies["console_session"]
        assert fleet.keys["operator_a"] not in cookie
        for attribute in ("HttpOnly", "SameSite=strict", "Max-Age=43200", "Path=/"):
            assert attribute.lower() in cookie.lower(), cookie
        # the read API takes the cookie as it takes a bearer key
        assert c.get("/robots").status_code == 200
        assert c.get("/console/me").json()["name"] == "operator_a"
        assert 'id="robots"' in c.get("/").text  # signed in: the console, not sign-in
        # a state-changing request with the cookie: only with this host's Origin
        target = f"/alerts/{own_alert(fleet)}/silence"
        for headers in ({}, {"Origin": "http://evil.example"}, {"Origin": "null"}):
            r = c.post(target, json={"minutes": 1}, headers=headers)
            assert r.status_code == 403, (headers, r.text)
        r = c.post(target, json={"minutes": 1}, headers=own)
        assert r.status_code == 200 and r.json()["silenced_until"], r.text
        # logout needs the Origin too; then the cookie is worthless and its stream ends
        assert c.post("/console/logout").status_code == 403
        with httpx.Client(base_url=url, timeout=10,
                          cookies={"console_session": session_id}) as s, \
                s.stream("GET", "/console/stream") as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(lines) == "event: hello"
            started = time.monotonic()
            assert c.post("/console/logout", headers=own).status_code == 200
            # returns once the server ends the response: now, even mid-snapshot (the
            # snapshot is read page by page, and a signed-out stream reads no more pages)
            list(lines)
            assert time.monotonic() - started < 5
        r = httpx.get(url + "/robots", cookies={"console_session": session_id})
        assert r.status_code == 401
        # signing out an expired or unknown session still clears the cookie
        r = httpx.post(url + "/console/logout", cookies={"console_session": session_id},
                       headers=own)
        assert r.status_code == 200 and 'console_session=""' in r.headers["set-cookie"]
