"""What needs attention, in a real browser: Debian's chromium driven by Selenium against a
running callback server fed through running edge agents by real Pudu webhooks.

The alert rules are set away from their defaults (``RULES``) so the page can only show
stale and low-battery robots as these tests expect if it judges by the settings the
server serves, not by constants of its own. Screenshots go to the test's tmp dir and to
``test-output/console/`` (and to ``$CONSOLE_SHOTS_DIR`` when set).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from callback_server.alerts import RULES as RULE_IDS
from callback_server.keys import Role, add_key
from tests import test_console
from tests.support.services import callback_server, edge_agent
from tests.test_console import BROKER, SHOTS, Fleet, cell, on_page, page_stats, sign_in

browser = test_console.browser  # the same fixture: Debian's chromium, headless

pytestmark = pytest.mark.integration
RULES = """\
rules:
  battery_low: {warning: 30, high: 10, critical: 5}
  robot_offline: {silent_seconds: 300}
"""


def shot(driver: WebDriver, fleet: Fleet, name: str) -> Path:
    """A screenshot in the test's tmp dir, copied where people look at them."""
    path = fleet.tmp / "shots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(path))
    targets = [SHOTS] + ([Path(d)] if (d := os.environ.get("CONSOLE_SHOTS_DIR")) else [])
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttentionFleet]:
    tmp = tmp_path_factory.mktemp("attention")
    keys_file = tmp / "keys.yaml"
    roles: list[tuple[str, Role]] = [("viewer_a", "viewer"), ("operator_a", "operator")]
    keys = {name: add_key(keys_file, name, ["acme"], role) for name, role in roles}
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    p = f"t{uuid.uuid4().hex[:8]}"
    agent_config = tmp / "edge.yaml"
    agent_config.write_text("heartbeat_seconds: 1\n")
    agent = {"TOPIC_PREFIX": p, "EDGE_AGENT_CONFIG": str(agent_config)}
    with callback_server(tmp, BROKER, f"sqlite:///{tmp / 'cb.db'}", TOPIC_PREFIX=p,
                         API_KEYS_FILE=str(keys_file), ALERT_RULES_FILE=str(rules)) as server, \
            edge_agent(tmp, BROKER, org="acme", gateway="gw-acme", **agent) as a:
        yield AttentionFleet(server, {"acme": a}, keys, tmp, agent)


@dataclass
class AttentionFleet(Fleet):
    agent_env: dict[str, str]  # what a further edge agent of this fleet is started with


def chips(driver: WebDriver) -> dict[str, int]:
    """The attention strip: kind -> count."""
    out = {}
    for a in driver.find_elements(By.CSS_SELECTOR, "#attention-counts li a"):
        out[a.find_element(By.XPATH, "..").get_attribute("data-kind") or ""] = int(
            a.get_attribute("data-count") or 0)
    return out


def fleet_sns(driver: WebDriver) -> list[str]:
    return [tr.get_attribute("data-sn") or "" for tr in
            driver.find_elements(By.CSS_SELECTOR, "#robots tbody tr[data-sn]")]


def search(driver: WebDriver, text: str) -> None:
    """Type ``text`` into the search as a person would (clear() fires no input event)."""
    box = driver.find_element(By.ID, "search")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    if text:
        box.send_keys(text)


def test_faults_stuck_offline_gateway_attention_links_and_bulk_acknowledge(
        fleet: AttentionFleet, browser: Callable[[], WebDriver]) -> None:
    tag = uuid.uuid4().hex[:5].upper()
    gateway = f"gw-down-{uuid.uuid4().hex[:4]}"  # not matched by a search for ``tag``
    fault, stuck, low, off, stale = (f"{k}{tag}" for k in ("F", "S", "L", "O", "T"))
    down1, down2 = f"D1{tag}", f"D2{tag}"
    now = int(time.time())
    for i, sn in enumerate((fault, stuck, low, off, stale)):
        fleet.post("acme", "robotStatus", sn=sn, run_status="WORKING",
                   timestamp=now - 400 if sn == stale else now)
        fleet.post("acme", "notifyRobotPose", sn=sn, x=float(i), y=1.0, yaw=0.0,
                   timestamp=now - 400 if sn == stale else now)
    fleet.post("acme", "notifyRobotMoveState", sn=stuck, state="STUCK")
    fleet.post("acme", "notifyRobotPower", sn=low, power=25, charge_stage="IDLE")
    fleet.post("acme", "robotStatus", sn=off, run_status="OFFLINE")
    fleet.post("acme", "robotErrorWarning", sn=fault, error_level="Fatal", error_type="Crash",
               error_detail="motor jammed", error_id=f"e{fault}")
    # a second site whose gateway goes away with its two robots
    with edge_agent(fleet.tmp, BROKER, org="acme", gateway=gateway, **fleet.agent_env) as down:
        for i, sn in enumerate((down1, down2)):
            body = {"callback_type": "robotStatus",
                    "data": {"sn": sn, "run_status": "WORKING", "timestamp": now}}
            assert httpx.post(down.url + "/api/pudu/webhook", json=body,
                              headers={"CallbackCode": "test-code"}).status_code == 200
            body = {"callback_type": "notifyRobotPose",
                    "data": {"sn": sn, "x": float(i), "y": 0.0, "yaw": 0.0, "timestamp": now}}
            assert httpx.post(down.url + "/api/pudu/webhook", json=body,
                              headers={"CallbackCode": "test-code"}).status_code == 200
        body = {"callback_type": "robotErrorWarning",
                "data": {"sn": down1, "error_level": "Warning", "error_type": "Bump",
                         "error_detail": "soft bump", "error_id": f"w{down1}", "timestamp": now}}
        assert httpx.post(down.url + "/api/pudu/webhook", json=body,
                          headers={"CallbackCode": "test-code"}).status_code == 200
        on_page(lambda: fleet.robot(down2) and fleet.robot(fault) and
                   (fleet.robot(low) or {}).get("charge_state"), "robots stored")

        operator = browser()
        sign_in(operator, fleet, "operator_a")
        on_page(lambda: cell(operator, down1, "status") == "working", "site up, working")
    # the gateway stopped: its last word was "offline"
    site = f"acme/{gateway}"
    on_page(lambda: (cell(operator, down1, "status") or "").startswith("unknown since"),
               "a robot behind an offline gateway is unknown, not its last state")
    assert (cell(operator, down2, "status") or "").startswith("unknown since")
    assert "unknown" in (operator.find_element(
        By.CSS_SELECTOR, f'#robots tr[data-sn="{down1}"]').get_attribute("class") or "")
    search(operator, "down")  # the site's robots: counted unknown, not working
    on_page(lambda: [li.text for li in operator.find_elements(By.CSS_SELECTOR, "#counts li")]
               == ["unknown: 2"], "counted as unknown")
    search(operator, "")

    # -- faults and stuck on the row; thresholds as the rules file set them --------------
    on_page(lambda: "fault (critical)" in (cell(operator, fault, "status") or ""),
               "fault on the row", timeout=30)
    status = operator.find_element(By.CSS_SELECTOR, f'#robots tr[data-sn="{fault}"] td.status')
    assert "s-fault" in (status.get_attribute("class") or "")
    assert "stuck" in (cell(operator, stuck, "status") or "")
    assert "low battery" in (cell(operator, low, "status") or "")  # 25 % <= 30 (not 20)
    assert cell(operator, off, "status") == "offline"
    search(operator, tag)
    expected = {"fault": 1, "stuck": 1, "offline": 1, "unknown": 2, "stale": 1, "low": 1,
                "alerts-critical": 1, "alerts-high": 1, "alerts-warning": 1}
    on_page(lambda: all(chips(operator).get(k) == v for k, v in expected.items()),
               f"attention counts {expected}", timeout=30)
    assert chips(operator)["gw-offline"] >= 1
    site_row = operator.find_element(By.CSS_SELECTOR, f'#sites tr[data-site="{site}"]')
    assert site_row.find_element(By.CSS_SELECTOR, "td.presence").text == "offline"
    assert site_row.find_element(By.CSS_SELECTOR, "td.unknown").text == "2"
    # markers coloured by what matters
    def marker(sn: str) -> str:
        found = operator.find_elements(By.CSS_SELECTOR, f'#floor g.marker[data-sn="{sn}"]')
        return (found[0].get_attribute("class") or "") if found else ""

    for sn, state in ((fault, "s-fault"), (stuck, "s-stuck"), (down1, "s-unknown"),
                      (low, "s-low")):
        on_page(partial(lambda sn, state: state in marker(sn), sn, state),
                   f"marker of {sn}: {state}")
    shot(operator, fleet, "attention-strip")

    # -- the strip's links are filtered views ------------------------------------------
    operator.find_element(By.CSS_SELECTOR, '#attention-counts li[data-kind="fault"] a').click()
    on_page(lambda: fleet_sns(operator) == [fault], "faulted robots only")
    assert operator.find_element(By.ID, "active-name").text == "faulted"
    shot(operator, fleet, "attention-link-faulted")
    operator.find_element(By.CSS_SELECTOR, '#attention-counts li[data-kind="unknown"] a').click()
    on_page(lambda: sorted(fleet_sns(operator)) == sorted([down1, down2]), "unknown only")
    operator.find_element(By.CSS_SELECTOR,
                          '#attention-counts li[data-kind="alerts-critical"] a').click()
    on_page(lambda: [r.get_attribute("data-rule") for r in operator.find_elements(
        By.CSS_SELECTOR, "#alerts tbody tr")] == ["robot_fault"], "critical alerts only")
    operator.find_element(By.ID, "clear-filter").click()
    on_page(lambda: len(fleet_sns(operator)) == 7, "all seven again (search kept)")
    search(operator, "stuck")  # what the page calls a robot is searchable too
    on_page(lambda: fleet_sns(operator) == [stuck], "stuck robots found by search")
    search(operator, tag)

    # -- alerts: severity then age, titles, detail, robot links --------------------------
    def ours() -> list[Any]:
        return [r for r in operator.find_elements(By.CSS_SELECTOR, "#alerts tbody tr")
                if tag in r.find_element(By.CSS_SELECTOR, "td.subject").text]

    on_page(lambda: len(ours()) == 3, "three alerts of ours")
    rows = ours()
    assert [r.find_element(By.CSS_SELECTOR, "td.severity").text for r in rows] == [
        "critical", "high", "warning"]
    assert [r.find_element(By.CSS_SELECTOR, "td.rule").text for r in rows] == [
        "Robot fault", "Robot offline", "Battery low"]
    assert "motor jammed" in rows[0].find_element(By.CSS_SELECTOR, "td.detail").text
    link = rows[0].find_element(By.CSS_SELECTOR, "td.subject a")
    assert (link.get_attribute("href") or "").endswith(f"#robot/{fault}")
    ack = rows[0].find_element(By.CSS_SELECTOR, "button.ack")
    assert ack.get_attribute("aria-label") == f"Acknowledge Robot fault on robot {fault}"

    # -- rows stay put under the pointer; a new alert waits to be shown -----------------
    ActionChains(operator).move_to_element(rows[1]).perform()
    before = [r.get_attribute("data-alert-id") for r in ours()]
    late = f"K{tag}"
    fleet.post("acme", "robotErrorWarning", sn=late, error_level="Fatal", error_type="Crash",
               error_detail="late", error_id=f"e{late}")
    button = operator.find_element(By.ID, "alerts-new")
    on_page(button.is_displayed, "new alerts announced, not inserted")
    assert button.text.startswith("1 new alert")
    assert [r.get_attribute("data-alert-id") for r in ours()] == before
    assert "new alert" in (operator.find_element(By.ID, "announce").get_attribute(
        "textContent") or "")
    button.click()
    on_page(lambda: len(ours()) == 4, "inserted on request")
    assert ours()[0].find_element(By.CSS_SELECTOR, "td.subject").text in (
        f"robot {fault}", f"robot {late}")  # both critical: the older first
    shot(operator, fleet, "alerts-ordered")

    # -- bulk acknowledge: every alert shown (this test's, by the search) ----------------
    operator.find_element(By.ID, "alerts-all").click()
    assert operator.find_element(By.ID, "alerts-ack").text == "Acknowledge selected (4)"
    operator.find_element(By.ID, "alerts-ack").click()
    on_page(lambda: all(r.find_element(By.CSS_SELECTOR, "td.state").text.startswith(
        "acknowledged") for r in ours()) and len(ours()) == 4, "all acknowledged")
    assert operator.find_element(By.ID, "bulk-result").text == "4 acknowledged"
    answer = httpx.get(fleet.server.url + "/alerts", params={"state": "acknowledged"},
                       headers=fleet.server.auth, timeout=5).json()["items"]
    assert sum(tag in a["subject_id"] for a in answer) == 4
    assert {a["acknowledged_by"] for a in answer if tag in a["subject_id"]} == {"operator_a"}
    shot(operator, fleet, "alerts-bulk-acknowledged")

    # -- one filter for everything: the site applies to every view ------------------------
    search(operator, "")
    Select(operator.find_element(By.ID, "filter-site")).select_by_value(site)
    on_page(lambda: sorted(fleet_sns(operator)) == sorted([down1, down2]), "fleet by site")
    on_page(lambda: [e.get_attribute("data-event") for e in operator.find_elements(
        By.CSS_SELECTOR, "#events tbody tr")] == [f"{down1}/w{down1}"], "events by site")
    assert [g.get_attribute("data-gateway") for g in operator.find_elements(
        By.CSS_SELECTOR, "#gateways tbody tr")] == [site]
    alerts = [(r.get_attribute("data-rule"), r.find_element(By.CSS_SELECTOR, "td.subject").text)
              for r in operator.find_elements(By.CSS_SELECTOR, "#alerts tbody tr")]
    assert alerts == [("gateway_offline", f"gateway {gateway}")], alerts
    assert [f.get_attribute("data-map") for f in operator.find_elements(
        By.CSS_SELECTOR, "#floor figure.map")] == [f"{site} · (no map)"]
    assert list(chips(operator).items())[:5] == [
        ("alerts-critical", 0), ("alerts-high", 1), ("alerts-medium", 0),
        ("alerts-warning", 0), ("alerts-info", 0)]
    shot(operator, fleet, "filter-site-every-view")

    # -- the robot page says so too ----------------------------------------------------------
    Select(operator.find_element(By.ID, "filter-site")).select_by_value("")
    operator.get(f"{fleet.server.url}/#robot/{fault}")
    on_page(lambda: "fault (critical)" in operator.find_element(By.ID, "robot-flags").text,
               "the robot page shows the fault")
    assert "motor jammed" in operator.find_element(By.ID, "robot-flags").text
    shot(operator, fleet, "robot-page-fault")
    operator.get(f"{fleet.server.url}/#robot/{down2}")
    on_page(lambda: "unknown since" in operator.find_element(By.ID, "robot-flags").text,
               "the robot page shows unknown")


def test_a_robot_without_a_status_yet_is_not_counted_unknown(
        fleet: AttentionFleet, browser: Callable[[], WebDriver]) -> None:
    """The fleet's "unknown" chip counts what the strip's "unknown (gateway offline)" does:
    a robot that has sent only a pose, its gateway up, has no status yet, not an unknown one."""
    sn = f"N{uuid.uuid4().hex[:6].upper()}"
    fleet.post("acme", "notifyRobotPose", sn=sn, x=1.0, y=1.0, yaw=0.0)
    on_page(lambda: fleet.robot(sn), "stored")
    viewer = browser()
    sign_in(viewer, fleet, "viewer_a")
    search(viewer, sn)
    on_page(lambda: [li.text for li in viewer.find_elements(By.CSS_SELECTOR, "#counts li")]
            == ["no status: 1"], "counted as no status")
    assert cell(viewer, sn, "status") == "no status"
    on_page(lambda: chips(viewer).get("unknown") == 0, "the strip agrees")
    Select(viewer.find_element(By.ID, "filter-status")).select_by_value("no status")
    on_page(lambda: fleet_sns(viewer) == [sn], "filtered by it")
    shot(viewer, fleet, "fleet-no-status")


def test_new_alerts_wait_while_the_keyboard_is_in_the_list(
        fleet: AttentionFleet, browser: Callable[[], WebDriver]) -> None:
    """Rows do not move under a keyboard user either: with the focus on an alert's button
    (the pointer elsewhere) a new alert waits behind the button; it is inserted when the
    focus leaves the list."""
    tag = uuid.uuid4().hex[:5].upper()
    first, late = f"A{tag}", f"B{tag}"
    operator = browser()
    sign_in(operator, fleet, "operator_a")
    search(operator, tag)
    fleet.post("acme", "robotErrorWarning", sn=first, error_level="Fatal", error_type="Crash",
               error_detail="first", error_id=f"e{first}")
    ack = f'#alerts tbody tr button.ack[aria-label$=" {first}"]'
    button = on_page(lambda: operator.find_elements(By.CSS_SELECTOR, ack), "first alert")[0]
    ActionChains(operator).move_to_element(operator.find_element(By.ID, "fleet-h")).perform()
    operator.execute_script("arguments[0].focus()", button)  # where Tab would put it
    fleet.post("acme", "robotErrorWarning", sn=late, error_level="Fatal", error_type="Crash",
               error_detail="late", error_id=f"e{late}")
    waiting = operator.find_element(By.ID, "alerts-new")
    on_page(waiting.is_displayed, "the new alert waits")
    assert waiting.text.startswith("1 new alert")

    def subjects() -> list[str]:
        return [r.text for r in operator.find_elements(By.CSS_SELECTOR,
                                                       "#alerts tbody td.subject")]

    assert subjects() == [f"robot {first}"]
    assert operator.switch_to.active_element == button
    shot(operator, fleet, "alerts-held-for-focus")
    operator.find_element(By.ID, "search").click()  # the focus leaves the list
    on_page(lambda: subjects() == [f"robot {first}", f"robot {late}"], "inserted after")
    assert not waiting.is_displayed()


def test_the_thresholds_are_the_served_rules(fleet: Fleet) -> None:
    """The page's hello carries the alert rules' settings (here from the rules file)."""
    with httpx.Client(base_url=fleet.server.url, timeout=10) as c, \
            c.stream("GET", "/console/stream", headers=fleet.server.auth) as stream:
        lines = stream.iter_lines()
        assert next(lines) == "event: hello"
        hello = json.loads(next(lines).removeprefix("data: "))
    rules = hello["rules"]
    assert rules["battery_low"]["warning"] == 30 and rules["robot_offline"]["silent_seconds"] == 300
    assert rules["robot_stuck"]["for_seconds"] == 120
    assert rules["gateway_backlog"]["max_age_seconds"] == 300
    assert rules["robot_fault"]["title"] == "Robot fault"
    assert "charging" in hello["charging_states"]
    assert set(rules) == set(RULE_IDS)  # every rule, by its id


# -- 50,000 robots -----------------------------------------------------------------------------
SEED = """
import asyncio, sys, time
from bridge.envelope import Envelope
from callback_server.store import open_store

async def main(url, n):
    async with open_store(url) as store:
        await store.migrate()
        now = time.time()
        for i in range(0, n, 5000):
            items = [Envelope(id=f"s{j}", type="notifyRobotStatus", org="acme",
                              device=f"B{j:05d}", gateway=f"gw{j % 10}", ts=now,
                              received_at=now, data={"status": "idle", "battery_level": 80},
                              raw={}, channel="status") for j in range(i, min(n, i + 5000))]
            await store.write_batch([(f"org/acme/device/{e.device}/status", e) for e in items])

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""
BIG = 50_000


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A callback server whose database holds 50,000 robots of org acme."""
    tmp = tmp_path_factory.mktemp("big")
    url = f"sqlite:///{tmp / 'cb.db'}"
    subprocess.run([sys.executable, "-c", SEED, url, str(BIG)], check=True, timeout=300)
    keys_file = tmp / "keys.yaml"
    keys = {"viewer_a": add_key(keys_file, "viewer_a", ["acme"], "viewer")}
    with callback_server(tmp, BROKER, url, TOPIC_PREFIX=f"t{uuid.uuid4().hex[:8]}",
                         API_KEYS_FILE=str(keys_file)) as server:
        yield Fleet(server, {}, keys, tmp)


def test_the_first_load_holds_all_50000_robots(big: Fleet) -> None:
    seen: set[str] = set()
    pages = 0
    with httpx.Client(base_url=big.server.url, timeout=60) as c:
        r = c.post("/console/session", json={"key": big.keys["viewer_a"]})
        assert r.status_code == 200
        with c.stream("GET", "/console/stream") as stream:
            event = ""
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    if event == "ready":
                        break
                elif line.startswith("data: ") and event == "robots":
                    page = json.loads(line[6:])
                    seen.update(r["robot_sn"] for r in page)
                    pages += 1
    assert len(seen) == BIG  # it stopped at 10,000 before
    assert pages == BIG // 1000  # sent a page at a time


def test_the_page_holds_all_50000_robots_and_draws_only_what_is_in_view(
        big: Fleet, browser: Callable[[], WebDriver]) -> None:
    viewer = browser()
    sign_in(viewer, big, "viewer_a")
    on_page(lambda: page_stats(viewer)["ready"],
               "snapshot loaded", timeout=120)
    on_page(lambda: viewer.find_element(By.ID, "total").text ==
               f"({BIG} shown of {BIG})", "every robot in the table", timeout=60)
    rows = viewer.find_elements(By.CSS_SELECTOR, "#robots tbody tr[data-sn]")
    assert 10 < len(rows) < 100, len(rows)  # virtualised: the rows in view, not 50,000
    assert rows[0].get_attribute("data-sn") == "B00000"
    viewer.execute_script("const b = document.getElementById('fleet-scroll');"
                          "b.scrollTop = b.scrollHeight;")
    on_page(lambda: viewer.find_elements(By.CSS_SELECTOR, '#robots tr[data-sn="B49999"]'),
               "the last robot reached by scrolling")
    assert len(viewer.find_elements(By.CSS_SELECTOR, "#robots tbody tr[data-sn]")) < 100
    nodes = viewer.execute_script("return document.getElementsByTagName('*').length")
    assert nodes < 5000, nodes
    search(viewer, "B4999")
    on_page(lambda: viewer.find_element(By.ID, "total").text == f"(10 shown of {BIG})",
               "search over all of them")
    on_page(lambda: fleet_sns(viewer) == [f"B4999{i}" for i in range(10)],
               "the rows found are the rows drawn")
    shot(viewer, big, "fleet-50000")


def test_one_key_signing_in_10000_times_leaves_another_keys_session_alive(
        fleet: AttentionFleet) -> None:
    url = fleet.server.url
    with httpx.Client(base_url=url, timeout=10) as c:
        r = c.post("/console/session", json={"key": fleet.keys["operator_a"]})
        operator = r.cookies["console_session"]
        viewers = []
        for _ in range(10_000):
            r = c.post("/console/session", json={"key": fleet.keys["viewer_a"]})
            assert r.status_code == 200
            viewers.append(r.cookies["console_session"])

    def me(session: str) -> int:
        return httpx.get(url + "/console/me", cookies={"console_session": session},
                         timeout=10).status_code

    assert me(operator) == 200  # before the cap per key, this signed the operator out
    assert me(viewers[-1]) == 200 and me(viewers[-50]) == 200
    assert me(viewers[0]) == 401 and me(viewers[-51]) == 401  # the viewer's oldest went
