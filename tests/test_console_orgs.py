"""Two orgs in one console: each org's robots, sites and floors stay its own, though both
orgs have a gateway called ``gw1``, a map called "1F" and a robot of the same sn.

Debian's chromium driven by Selenium, against a callback server fed by two running edge
agents (one per org, both gateway ``gw1``) through real Pudu webhooks. Screenshots go to
``test-output/console/`` (and to ``$CONSOLE_SHOTS_DIR`` when set).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from callback_server.keys import add_key
from tests import test_console
from tests.support.services import callback_server, edge_agent
from tests.test_console import BROKER, Fleet, on_page, sign_in
from tests.test_console_attention import shot

browser = test_console.browser  # the same fixture: Debian's chromium, headless

pytestmark = pytest.mark.integration
ORGS = ("north", "south")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("orgs")
    keys_file = tmp / "keys.yaml"
    keys = {"viewer_both": add_key(keys_file, "viewer_both", list(ORGS), "viewer")}
    p = f"t{uuid.uuid4().hex[:8]}"

    def site(org: str) -> Path:  # each gateway its own outbox: both are called gw1
        (tmp / org).mkdir()
        return tmp / org

    with callback_server(tmp, BROKER, f"sqlite:///{tmp / 'cb.db'}", TOPIC_PREFIX=p,
                         API_KEYS_FILE=str(keys_file)) as server, \
            edge_agent(site("north"), BROKER, org="north", gateway="gw1",
                       TOPIC_PREFIX=p) as north, \
            edge_agent(site("south"), BROKER, org="south", gateway="gw1",
                       TOPIC_PREFIX=p) as south:
        yield Fleet(server, {"north": north, "south": south}, keys, tmp)


def on_floor(fleet: Fleet, org: str, sn: str, x: float) -> None:
    """The robot on map "1F" at (x, 1): the map name comes with a robotErrorNotice's
    extend_info (docs/pudu.md; a pose webhook carries none)."""
    fleet.post(org, "robotErrorNotice", sn=sn, error_level="Event", error_type="Note",
               error_detail="map", error_id=f"m-{org}-{sn}",
               extend_info={"map_name": "1F", "position": {"x": x, "y": 1.0, "yaw": 0.0}})


def rows(driver: WebDriver, sn: str) -> dict[str, Any]:
    """The fleet's rows of robot ``sn``, by org."""
    return {tr.get_attribute("data-org") or "": tr for tr in
            driver.find_elements(By.CSS_SELECTOR, f'#robots tbody tr[data-sn="{sn}"]')}


def test_two_orgs_same_gateway_map_and_sn_stay_apart(
        fleet: Fleet, browser: Callable[[], WebDriver]) -> None:
    sn = f"R{uuid.uuid4().hex[:6]}"
    for i, org in enumerate(ORGS):
        fleet.post(org, "robotStatus", sn=sn, run_status="WORKING")
        on_floor(fleet, org, sn, float(10 * i))
    # only north's robot faults
    fleet.post("north", "robotErrorWarning", sn=sn, error_level="Fatal", error_type="Crash",
               error_detail="motor", error_id=f"f-{sn}")

    def both_stored() -> bool:
        r = httpx.get(f"{fleet.server.url}/robots", params={"limit": 100},
                      headers=fleet.server.auth, timeout=5)
        found = {(x["org_id"], x["map_name"]) for x in r.json()["items"] if x["robot_sn"] == sn}
        return found == {("north", "1F"), ("south", "1F")}

    on_page(both_stored, "both orgs' robots stored with their map")
    driver = browser()
    sign_in(driver, fleet, "viewer_both")

    # -- two rows, one per org: the same sn is two robots ---------------------------------
    on_page(lambda: set(rows(driver, sn)) == set(ORGS), "a row per org")
    assert driver.find_element(By.ID, "total").text == "(2 shown of 2)"
    # the fault is north's alone: south's robot is working, untagged
    on_page(lambda: "fault (critical)" in rows(driver, sn)["north"].find_element(
        By.CSS_SELECTOR, "td.status").text, "north's robot faulted")
    south = rows(driver, sn)["south"].find_element(By.CSS_SELECTOR, "td.status")
    assert south.text == "working", south.text
    assert "s-fault" not in (south.get_attribute("class") or "")
    alert = on_page(lambda: driver.find_elements(By.CSS_SELECTOR,
                                                  '#alerts tbody tr[data-rule="robot_fault"]'),
                    "the fault's alert")
    assert [a.find_element(By.CSS_SELECTOR, "td.site").text for a in alert] == ["north/gw1"]
    # two sites, not one: the site filter and the sites table name the org
    options = [o.get_attribute("value") for o in
               driver.find_elements(By.CSS_SELECTOR, "#filter-site option")]
    assert options == ["", "north/gw1", "south/gw1"], options

    # -- two floors called 1F: each site's, with its own robot ----------------------------
    def floors() -> dict[str, list[tuple[str, str]]] | None:
        figures = driver.find_elements(By.CSS_SELECTOR, "#floor figure.map")
        out = {f.get_attribute("data-map") or "": [
            (g.get_attribute("data-org") or "", g.get_attribute("class") or "")
            for g in f.find_elements(By.CSS_SELECTOR, f'g.marker[data-sn="{sn}"]')]
            for f in figures}
        return out if len(out) == 2 else None

    drawn = on_page(floors, "two floors")
    assert sorted(drawn) == ["north/gw1 · 1F", "south/gw1 · 1F"], drawn
    assert [org for org, _ in drawn["north/gw1 · 1F"]] == ["north"]
    assert [org for org, _ in drawn["south/gw1 · 1F"]] == ["south"]
    on_page(lambda: "s-fault" in (floors() or {}).get("north/gw1 · 1F", [("", "")])[0][1],
            "north's marker faulted")
    assert "s-fault" not in (floors() or {})["south/gw1 · 1F"][0][1]
    captions = sorted(c.text for c in driver.find_elements(By.CSS_SELECTOR,
                                                          "#floor figcaption"))
    assert captions == ["gw1 · north · 1F — 1 robot(s)", "gw1 · south · 1F — 1 robot(s)"]
    driver.execute_script("document.getElementById('floor-section').scrollIntoView()")
    shot(driver, fleet, "two-orgs-floors")

    # -- a move of south's robot moves south's marker only --------------------------------
    def cx(org: str) -> str:
        return driver.find_element(
            By.CSS_SELECTOR, f'#floor g.marker[data-org="{org}"][data-sn="{sn}"]').get_attribute(
            "data-x") or ""

    north_x = cx("north")
    fleet.post("south", "notifyRobotPose", sn=sn, x=14.0, y=1.0, yaw=0.0,
               timestamp=int(time.time()) + 1)
    on_page(lambda: cx("south") == "14", "south's marker moved")
    assert cx("north") == north_x
    shot(driver, fleet, "two-orgs-fleet")
