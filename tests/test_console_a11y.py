"""The console checked as a keyboard or screen-reader user, on a desk and on a phone.

axe-core (vendored under console/static/vendor, injected only here) runs on the signed-in
page at 1440 px and 390 px: no serious or critical violation is allowed, and at 390 px the
page is no wider than the phone.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from tests.support.mqtt_probe import publish_once
from tests.support.services import edge_agent
from tests.test_console import (
    BROKER,
    CHROMEDRIVER,
    CHROMIUM,
    Fleet,
    alert_row,
    cell,
    fleet,
    on_page,
    page_stats,
    shot,
    sign_in,
)

pytestmark = pytest.mark.integration
__all__ = ["fleet"]  # the module's fleet fixture, shared with tests/test_console.py
AXE = (Path(__file__).resolve().parents[1] / "callback_server" / "console" / "static"
       / "vendor" / "axe-core" / "axe.min.js")
SERIOUS = {"serious", "critical"}
# each view's address (#view/<name>, "" = everything) and the section it shows
VIEWS = {"": "fleet", "attention": "attention", "alerts": "alerts-section", "fleet": "fleet",
         "events": "events-section", "gateways": "gateways-section", "floors": "floor-section"}


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    """One browser for the module: CI time is shared."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1440,1000", "--disable-gpu"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield d
    d.quit()


def axe_violations(driver: WebDriver) -> list[dict[str, object]]:
    """Serious and critical violations axe-core finds on the page as it is now."""
    if not driver.execute_script("return !!window.axe"):
        driver.execute_script(AXE.read_text(encoding="utf-8"))
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']})"
        ".then(r => done(JSON.stringify(r.violations)), e => done(JSON.stringify(String(e))));")
    found = json.loads(result)
    assert isinstance(found, list), found
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "nodes": [n["target"] for n in v["nodes"][:5]]}
            for v in found if v["impact"] in SERIOUS]


# The classes console.css colours a state with: a robot's status (``.s-*``), a severity
# (``.sev-*``), a flag (``.tag.*``) and a row (``tr.*``). Every one must be on a page axe
# checks, so a state given a colour is checked for contrast; an alert row's own state
# (``tr.st-*``) and the fleet's spacer rows are not states of a robot.
STATE_CLASS = re.compile(
    r"\.s-[a-z-]+|\.sev-[a-z-]+|\.tag\.[a-z-]+|(?<![\w.-])tr\.(?!st-|spacer)[a-z-]+")


def coloured_states() -> set[str]:
    css = (AXE.parents[2] / "console.css").read_text(encoding="utf-8")
    return set(STATE_CLASS.findall(css))


def every_state(fleet: Fleet) -> dict[str, str]:
    """A fleet in every state the page colours: working, idle and low, online, in error,
    charging, offline, stuck, faulted and low, stale, with no status yet, behind an offline
    gateway; events of every level; a gateway backlogged. Returns name -> sn."""
    tag = uuid.uuid4().hex[:5].upper()
    names = ("working", "idle", "online", "error", "charging", "offline", "stuck", "fault",
             "stale", "nostatus", "down")
    sns = {k: f"{k.upper()}-{tag}" for k in names}
    now = int(time.time())
    post = fleet.post
    for i, (name, sn) in enumerate(sns.items()):
        if name != "down":  # the down robot's gateway is started below
            post("acme", "notifyRobotPose", sn=sn, x=float(i), y=1.0, yaw=0.0,
                 timestamp=now - 1200 if name == "stale" else now)
    post("acme", "robotStatus", sn=sns["working"], run_status="WORKING")
    post("acme", "notifyRobotPower", sn=sns["working"], power=80, charge_stage="IDLE")
    post("acme", "notifyRobotStatus", sn=sns["idle"], run_state="IDLE", battery=15)
    post("acme", "robotStatus", sn=sns["online"], run_status="ONLINE")
    post("acme", "robotStatus", sn=sns["error"], run_status="ERROR")
    post("acme", "robotStatus", sn=sns["charging"], run_status="ONLINE")
    post("acme", "notifyRobotPower", sn=sns["charging"], power=4, charge_stage="CHARGING")
    post("acme", "robotStatus", sn=sns["offline"], run_status="OFFLINE")
    post("acme", "robotStatus", sn=sns["stuck"], run_status="WORKING")
    post("acme", "notifyRobotMoveState", sn=sns["stuck"], state="STUCK")
    post("acme", "robotStatus", sn=sns["fault"], run_status="WORKING")
    post("acme", "notifyRobotPower", sn=sns["fault"], power=12, charge_stage="IDLE")
    post("acme", "robotStatus", sn=sns["stale"], run_status="WORKING", timestamp=now - 1200)
    # a fault (critical), and events of every level: critical, high, warning, medium, info
    post("acme", "robotErrorWarning", sn=sns["fault"], error_level="Fatal", error_type="Crash",
         error_detail="motor stalled", error_id=f"e-{tag}-1")
    post("acme", "robotErrorWarning", sn=sns["online"], error_level="Error", error_type="Lidar",
         error_detail="lidar dirty", error_id=f"e-{tag}-2")
    post("acme", "robotErrorWarning", sn=sns["working"], error_level="Warning",
         error_type="Bump", error_detail="soft bump", error_id=f"e-{tag}-3")
    post("acme", "robotErrorWarning", sn=sns["working"], error_type="Odd",
         error_detail="no level", error_id=f"e-{tag}-4")
    post("acme", "robotErrorWarning", sn=sns["working"], error_level="Event",
         error_type="Note", error_detail="door opened", error_id=f"e-{tag}-5")
    prefix = fleet.server.env["TOPIC_PREFIX"]
    with edge_agent(fleet.tmp, BROKER, org="acme", gateway=f"gw-down-{tag.lower()}",
                    TOPIC_PREFIX=prefix) as down:
        for callback_type, data in (("robotStatus", {"run_status": "WORKING"}),
                                    ("notifyRobotPose", {"x": 0.0, "y": 0.0, "yaw": 0.0})):
            body = {"callback_type": callback_type,
                    "data": {"sn": sns["down"], "timestamp": now, **data}}
            assert httpx.post(down.url + "/api/pudu/webhook", json=body,
                              headers={"CallbackCode": "test-code"}, timeout=10).is_success
        on_page(lambda: fleet.robot(sns["down"]), "the down site's robot stored")
    # a gateway whose outbox is 20 minutes behind (gateway_backlog: 300 s)
    beat = {"timestamp": time.time(), "outbox_depth": 500, "outbox_oldest_age_s": 1200}
    publish_once(BROKER, f"{prefix}/org/acme/device/gw-full-{tag.lower()}/telemetry",
                 json.dumps(beat))
    return sns


def test_every_view_by_address_at_desk_and_phone_width_axe_clean(
        fleet: Fleet, driver: WebDriver) -> None:
    """axe on every view with the fleet in every state the page colours: the contrast of
    each state's colour is checked, not only the states one robot happens to be in."""
    sns = every_state(fleet)
    sn, stuck = sns["working"], sns["stuck"]
    sign_in(driver, fleet, "operator_a")
    on_page(lambda: "stuck" in (cell(driver, stuck, "status") or "") and
            "fault" in (cell(driver, sns["fault"], "status") or "") and
            (cell(driver, sns["down"], "status") or "").startswith("unknown since"),
            "every state shown", timeout=40)
    zone = driver.execute_script("return Intl.DateTimeFormat().resolvedOptions().timeZone")
    assert driver.find_element(By.ID, "tz").text == f"times in {zone}"
    driver.set_script_timeout(60)
    unseen = coloured_states()
    assert {".s-working", ".tag.stuck", ".s-unknown"} <= unseen, unseen  # the CSS was read
    for width in (1440, 390):
        driver.set_window_size(width, 1000)
        for view, section in VIEWS.items():
            driver.get(f"{fleet.server.url}/#view/{view}" if view else f"{fleet.server.url}/")
            on_page(lambda: cell(driver, sn, "status") is not None, "page drawn")
            sections = driver.find_elements(By.CSS_SELECTOR, "main > section")
            shown = [s.get_attribute("id") for s in sections if s.is_displayed()]
            assert section in shown and (not view or shown == [section]), (view, shown)
            if view in ("floors", ""):  # drawn on showing, though other views left it undrawn
                on_page(lambda: driver.find_elements(
                    By.CSS_SELECTOR, f'#floor g.marker.s-stuck[data-sn="{stuck}"]'),
                    "marker drawn")
            if view in ("gateways", ""):
                on_page(lambda: driver.find_elements(By.CSS_SELECTOR, "#gateways tr.backlogged")
                        and driver.find_elements(By.CSS_SELECTOR, "#gateways td.s-offline"),
                        "gateways drawn")
            current = driver.find_element(By.CSS_SELECTOR, "#views a[aria-current=page]")
            assert current.get_attribute("data-view") == view
            unseen -= shown_states(driver, unseen)
            bad = axe_violations(driver)
            shot(driver, fleet, f"view-{view or 'everything'}-{width}")
            assert not bad, (view, width, json.dumps(bad, indent=1))
            if width == 390:
                overflow = driver.execute_script(
                    "return document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 0, f"{view}: the page is {overflow} px wider than a phone"
        # the robot page's flags: fault and low; stuck; stale; offline; unknown
        for name, flag in (("fault", "fault (critical)"), ("stuck", "stuck"),
                           ("stale", "stale"), ("offline", "offline"), ("down", "unknown since")):
            driver.get(f"{fleet.server.url}/#robot/{sns[name]}")
            on_page(partial(flagged, driver, sns[name], flag), f"{name}: {flag}")
            unseen -= shown_states(driver, unseen)
            bad = axe_violations(driver)
            shot(driver, fleet, f"robot-{name}-{width}")
            assert not bad, (name, width, json.dumps(bad, indent=1))
    driver.set_window_size(1440, 1000)
    # every colour the CSS gives a state was on a page axe checked
    assert not unseen, f"states coloured by console.css that no checked page showed: {unseen}"


def flagged(driver: WebDriver, sn: str, flag: str) -> bool:
    """The robot page is ``sn``'s and its flags say ``flag``."""
    return driver.find_element(By.ID, "robot-sn").text == sn and \
        flag in driver.find_element(By.ID, "robot-flags").text


def shown_states(driver: WebDriver, selectors: set[str]) -> set[str]:
    """Those of ``selectors`` that match an element shown on the page now."""
    found: list[str] = driver.execute_script(
        "return arguments[0].filter((s) => [...document.querySelectorAll(s)]"
        ".some((e) => e.getClientRects().length))", sorted(selectors))
    return set(found)


def test_fleet_sorts_by_keyboard_alone(fleet: Fleet, driver: WebDriver) -> None:
    driver.delete_all_cookies()  # signed out: the viewer signs in afresh
    sign_in(driver, fleet, "viewer_a")
    # a header is a column header holding a button: "Battery, button", and the column's
    # sort order is announced from the header (aria-sort), the default sort's too
    first = driver.find_element(By.CSS_SELECTOR, '#robots th[data-key="robot_sn"]')
    assert first.get_attribute("aria-sort") == "ascending"
    header = driver.find_element(By.CSS_SELECTOR, '#robots th[data-key="battery_level"]')
    button = header.find_element(By.CSS_SELECTOR, "button.sort")
    assert (header.aria_role, button.aria_role, button.accessible_name) == (
        "columnheader", "button", "Battery")
    assert header.get_attribute("aria-sort") is None
    button.send_keys(Keys.ENTER)
    assert header.get_attribute("aria-sort") == "ascending"
    assert first.get_attribute("aria-sort") is None
    button.send_keys(Keys.SPACE)
    on_page(lambda: header.get_attribute("aria-sort") == "descending", "sorted descending")
    # the views are links: Enter on one opens its view, and its address
    driver.find_element(By.CSS_SELECTOR, '#views a[data-view="alerts"]').send_keys(Keys.ENTER)
    on_page(lambda: driver.current_url.endswith("#view/alerts"), "address follows")
    assert driver.find_element(By.ID, "alerts-section").is_displayed()
    assert not driver.find_element(By.ID, "fleet").is_displayed()


def test_critical_alert_announced_then_acknowledged_and_a_command_sent_by_keyboard(
        fleet: Fleet, driver: WebDriver) -> None:
    driver.delete_all_cookies()
    sign_in(driver, fleet, "operator_a")
    on_page(lambda: page_stats(driver)["ready"], "page ready")
    sn = f"K{uuid.uuid4().hex[:6]}"
    fleet.post("acme", "robotErrorWarning", sn=sn, error_level="Fatal", error_type="Crash",
               error_detail="wheel jammed", error_id=f"k-{sn}")
    region = driver.find_element(By.ID, "announce-critical")
    assert region.get_attribute("role") == "alert"
    said = str(on_page(lambda: sn in (region.get_attribute("textContent") or "")
                          and region.get_attribute("textContent"), "critical alert announced"))
    assert said.startswith("Critical: ") and "{" not in said, said

    # acknowledge with Enter on the row's button, whose name says which alert it is
    ack = on_page(lambda: [b for b in driver.find_elements(By.CSS_SELECTOR, "#alerts button.ack")
                              if sn in (b.get_attribute("aria-label") or "")], "ack button")[0]
    ack.send_keys(Keys.ENTER)
    on_page(lambda: not [b for b in driver.find_elements(By.CSS_SELECTOR, "#alerts button.ack")
                            if sn in (b.get_attribute("aria-label") or "")], "acknowledged")

    # a gateway command by keyboard: its answer in plain words
    driver.get(f"{fleet.server.url}/#view/gateways")
    row = '#gateways tr[data-gateway="acme/gw-acme"]'
    send = on_page(lambda: driver.find_elements(By.CSS_SELECTOR, f"{row} button.cmd"),
                      "gateway command")[0]
    send.send_keys(Keys.ENTER)
    out = driver.find_element(By.CSS_SELECTOR, f"{row} .cmd-out")
    text = str(on_page(lambda: out.text.startswith("ping: answered") and out.text,
                          "ping answered"))
    assert "pong yes" in text and "gateway id gw-acme" in text, text
    assert re.search(r"^time \S*\d{4}", text, re.M) and not re.search(r"\d{10}", text), text
    bad = axe_violations(driver)
    shot(driver, fleet, "keyboard-command-answer")
    assert not bad, json.dumps(bad, indent=1)


def test_gateway_commands_are_the_gateways_own(fleet: Fleet, driver: WebDriver) -> None:
    """The command list comes from the gateway's get_status, not from a copy in the page."""
    driver.get(f"{fleet.server.url}/#view/gateways")
    select = '#gateways tr[data-gateway="acme/gw-acme"] select.cmd-name option'
    def offered() -> list[str] | None:
        options = driver.find_elements(By.CSS_SELECTOR, select)
        return [str(o.get_attribute("value")) for o in options] if len(options) > 2 else None

    names = on_page(offered, "commands read from get_status")
    assert names[:2] == ["ping", "get_status"] and "flush_outbox" in names, names
    assert not [n for n in names if n.startswith("pudu.")], names


def press(driver: WebDriver, *keys: str) -> None:
    """Keys sent to whatever has the focus, as a keyboard would (no element is picked)."""
    ActionChains(driver).send_keys(*keys).perform()


def tab_to(driver: WebDriver, match: Callable[[WebElement], bool], what: str,
           limit: int = 400) -> WebElement:
    """Tab (only Tab) until the focused element is the one wanted; every stop on the way
    must be visible, or a keyboard user would lose the focus."""
    for _ in range(limit):
        press(driver, Keys.TAB)
        focused = driver.switch_to.active_element
        if focused.tag_name != "body":
            assert focused.is_displayed(), f"the focus went to a hidden {focused.tag_name}"
        if match(focused):
            return focused
    raise AssertionError(f"Tab never reached {what}")


def attr(name: str, value: str) -> Callable[[WebElement], bool]:
    return lambda e: value in (e.get_attribute(name) or "")


def test_a_keyboard_walk_with_tab_enter_space_and_arrows_only(
        fleet: Fleet, driver: WebDriver) -> None:
    """Through the views, sorting a column, acknowledging an alert and sending a command,
    with no key but Tab, Enter, Space and the arrows (the sign-in key is typed once)."""
    sn = f"W{uuid.uuid4().hex[:6]}"
    fleet.post("acme", "robotStatus", sn=sn, run_status="ONLINE")
    fleet.post("acme", "notifyRobotPower", sn=sn, power=3, charge_stage="IDLE")
    for other, power in ((f"{sn}b", 90), (f"{sn}c", 50)):  # something to sort
        fleet.post("acme", "robotStatus", sn=other, run_status="ONLINE")
        fleet.post("acme", "notifyRobotPower", sn=other, power=power, charge_stage="IDLE")
    fleet.post("acme", "robotErrorWarning", sn=sn, error_level="Fatal", error_type="Crash",
               error_detail="bumper stuck", error_id=f"w-{sn}")
    driver.delete_all_cookies()
    sign_in(driver, fleet, "operator_a")
    on_page(lambda: cell(driver, sn, "status") and cell(driver, f"{sn}b", "battery")
               and cell(driver, f"{sn}c", "battery"), "robot rows shown")

    # -- the Fleet view, then sort by battery: Enter ascending, Space descending ---------
    tab_to(driver, attr("data-view", "fleet"), "the Fleet view link")
    press(driver, Keys.ENTER)
    on_page(lambda: driver.current_url.endswith("#view/fleet"), "address follows")
    assert not driver.find_element(By.ID, "alerts-section").is_displayed()
    tab_to(driver, lambda e: e.get_attribute("class") == "sort" and e.text == "Battery",
           "the Battery header's button")
    header = driver.find_element(By.CSS_SELECTOR, '#robots th[data-key="battery_level"]')
    press(driver, Keys.ENTER)
    assert header.get_attribute("aria-sort") == "ascending"

    def levels() -> list[int]:
        cells = driver.find_elements(By.CSS_SELECTOR, "#robots tbody tr[data-sn] td.battery")
        return [int(c.text.split()[0]) for c in cells if c.text.split()[0].isdigit()]

    def ordered(first: Callable[[list[int]], int]) -> list[int] | None:
        v = levels()
        return v if v and v[0] == first(v) else None

    up = on_page(lambda: ordered(min), "lowest first")
    assert up == sorted(up) and up[0] <= 3 and {3, 50, 90} <= set(up), up
    shot(driver, fleet, "keyboard-1-fleet-sorted-by-battery")
    press(driver, Keys.SPACE)
    on_page(lambda: header.get_attribute("aria-sort") == "descending", "sorted descending")
    down = on_page(lambda: ordered(max), "highest first")
    assert down == sorted(down, reverse=True), down

    # -- Tab on round to the Alerts view; acknowledge the robot's alert with Enter -------
    tab_to(driver, attr("data-view", "alerts"), "the Alerts view link")
    press(driver, Keys.ENTER)
    on_page(lambda: driver.current_url.endswith("#view/alerts"), "alerts address")
    on_page(lambda: alert_row(driver, sn), "the robot's alert listed")
    # each button names its alert: the battery one (also critical, 3 %) is passed by
    tab_to(driver, attr("aria-label", f"Acknowledge Robot fault on robot {sn}"),
           "the fault's Acknowledge button")
    shot(driver, fleet, "keyboard-2-alert-focused")
    press(driver, Keys.ENTER)
    on_page(lambda: alert_row(driver, sn).find_element(By.CSS_SELECTOR, "td.state").text
               == "acknowledged", "acknowledged")
    assert alert_row(driver, sn, "battery_low").find_element(By.CSS_SELECTOR, "td.state").text \
        == "open"  # the other one untouched
    # the focus stayed in the row (on its next control), not thrown back to the page's top
    focused = driver.switch_to.active_element
    assert focused.get_attribute("aria-label") == f"Silence 1 h: Robot fault on robot {sn}"
    shot(driver, fleet, "keyboard-3-alert-acknowledged")

    # -- the Gateways view: choose get_status with the arrows, send it with Space --------
    tab_to(driver, attr("data-view", "gateways"), "the Gateways view link")
    press(driver, Keys.ENTER)
    on_page(lambda: driver.current_url.endswith("#view/gateways"), "gateways address")
    row = '#gateways tr[data-gateway="acme/gw-acme"]'
    on_page(lambda: len(driver.find_elements(By.CSS_SELECTOR, f"{row} select.cmd-name option"))
               > 2, "the gateway's own commands offered")
    select = tab_to(driver, attr("aria-label", "command for gateway gw-acme"), "its command list")
    press(driver, Keys.ARROW_DOWN)
    assert select.get_attribute("value") == "get_status", select.get_attribute("value")
    tab_to(driver, attr("aria-label", "Send the command to gateway gw-acme"), "Send")
    press(driver, Keys.SPACE)
    out = driver.find_element(By.CSS_SELECTOR, f"{row} .cmd-out")
    try:
        text = str(on_page(lambda: out.text.startswith("get_status: answered") and out.text,
                              "get_status answered", timeout=30))
    except TimeoutError:
        shot(driver, fleet, "keyboard-4-command-not-answered")
        raise AssertionError(f"no answer; the page says {out.text[:300]!r}") from None
    shot(driver, fleet, "keyboard-4-command-answered")
    assert "gateway id gw-acme" in text and "{" not in text.split("raw answer")[0], text
