"""The alert rules' pure decisions and their settings file."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import ConfigError
from callback_server.alerts.rules import (
    RULES,
    BatteryLow,
    GatewayBacklog,
    GatewayClock,
    GatewayOffline,
    PollFailed,
    RobotFault,
    RobotOffline,
    RobotSilent,
    RobotStuck,
    Rules,
    backlog_severity,
    battery_severity,
    charging,
    clock_severity,
    facts_known,
    fault_severity,
    gateway_offline_severity,
    load_alert_settings,
    offline_severity,
    poll_failed_severity,
    silent_severity,
    stuck_severity,
)


def walk(levels: list[float], rule: BatteryLow | None = None,
         on_charge: bool = False) -> list[str | None]:
    """The severity after each level, each step starting from the one before."""
    rule = rule or BatteryLow()
    held: str | None = None
    out = []
    for level in levels:
        held = battery_severity(rule, level, on_charge, held)
        out.append(held)
    return out


def test_battery_opens_at_each_threshold_and_escalates() -> None:
    assert walk([50, 21, 20, 11, 10, 6, 5, 0]) == [
        None, None, "warning", "warning", "high", "high", "critical", "critical"]
    assert walk([8]) == ["high"]  # straight in at the level it is at


def test_battery_steps_down_only_past_threshold_plus_hysteresis() -> None:
    assert walk([4, 9, 10, 11]) == ["critical"] * 3 + ["high"]  # held up to 5 + 5 = 10
    assert walk([4, 10.5]) == ["critical", "high"]
    assert walk([8, 15, 15.5]) == ["high", "high", "warning"]
    assert walk([19, 25, 25.5]) == ["warning", "warning", None]


def test_battery_does_not_flap_around_a_threshold() -> None:
    wobble = [21, 19, 21, 19.5, 22, 20, 24, 21]
    seen = walk(wobble)
    assert seen[0] is None and all(s == "warning" for s in seen[1:])


def test_charging_or_full_resolves_and_unknown_keeps() -> None:
    rule = BatteryLow()
    assert battery_severity(rule, 3, True, "critical") is None
    assert battery_severity(rule, None, False, "high") == "high"
    assert charging("charging", None) and charging("charge_full", None)
    assert charging("CHARGE_FULL_USE_PILE", None)
    assert not charging("idle", None) and not charging("stop_charge_use_pile", True)
    assert charging(None, True) and not charging(None, None)


def test_custom_thresholds_are_validated() -> None:
    assert walk([29, 14], BatteryLow(warning=30, high=15, critical=3, hysteresis=0)) == [
        "warning", "high"]
    with pytest.raises(ValueError):
        BatteryLow(warning=5, high=10)


def test_fault_takes_the_higher_level_and_ignores_others() -> None:
    rule = RobotFault()
    assert fault_severity(rule, "high", None) == "high"
    assert fault_severity(rule, "critical", "high") == "critical"
    assert fault_severity(rule, "high", "critical") == "critical"
    assert fault_severity(rule, "warning", None) is None
    assert fault_severity(rule, "warning", "high") == "high"


def test_time_rules_follow_the_clock_they_are_given() -> None:
    offline, silent, stuck = RobotOffline(), RobotSilent(), RobotStuck()
    assert offline_severity(offline, "offline", 1000, 1000) == "high"
    assert offline_severity(offline, "online", 1000, 1599) is None
    assert offline_severity(offline, "online", 1000, 1600) == "high"
    assert silent_severity(silent, 0, 1799) is None
    assert silent_severity(silent, 0, 1800) == "warning"
    assert stuck_severity(stuck, None, 10_000) is None
    assert stuck_severity(stuck, 100, 219) is None and stuck_severity(stuck, 100, 220) == "high"


def test_gateway_presence_and_backlog() -> None:
    g, b = GatewayOffline(), GatewayBacklog()
    assert gateway_offline_severity(g, "offline", None) == "high"
    assert gateway_offline_severity(g, "online", "high") is None
    assert gateway_offline_severity(g, "weird", "high") == "high"
    assert backlog_severity(b, 301, None) == "warning"
    assert backlog_severity(b, 300, None) is None
    assert backlog_severity(b, 240, "warning") == "warning"  # held down to 300 - 60
    assert backlog_severity(b, 239.9, "warning") is None
    assert backlog_severity(b, None, "warning") == "warning"


def test_a_partial_run_opens_poll_failed_unless_turned_off() -> None:
    rule = PollFailed()
    assert poll_failed_severity(rule, "partial", None) == "warning"  # the default
    assert poll_failed_severity(rule, "failed", None) == "warning"
    assert poll_failed_severity(rule, "ok", "warning") is None
    assert poll_failed_severity(rule, "running", "warning") == "warning"
    failed_only = PollFailed(on_partial=False)
    assert poll_failed_severity(failed_only, "partial", None) is None
    assert poll_failed_severity(failed_only, "partial", "warning") == "warning"  # nor resolves
    assert poll_failed_severity(failed_only, "failed", None) == "warning"


def test_backlog_does_not_flap_around_its_threshold() -> None:
    """The audit's heartbeats: 301, 299, 302, 298, 303 s opened three alerts; now one."""
    held: str | None = None
    seen = []
    for age in (301, 299, 302, 298, 303, 250, 241, 239, 299, 300, 301):
        held = backlog_severity(GatewayBacklog(), age, held)
        seen.append(held)
    assert seen == ["warning"] * 7 + [None, None, None, "warning"]
    tight = GatewayBacklog(max_age_seconds=60, hysteresis_seconds=0)
    assert backlog_severity(tight, 59.9, "warning") is None
    with pytest.raises(ValueError, match="hysteresis_seconds"):
        GatewayBacklog(max_age_seconds=60)  # the default 60 s would never let it resolve


def test_rules_file_overrides_defaults_and_names_a_bad_key(tmp_path: Path) -> None:
    assert load_alert_settings(None).rules.battery_low.warning == 20
    good = tmp_path / "rules.yaml"
    good.write_text("rules:\n  battery_low: {warning: 30}\n  robot_silent: {enabled: false}\n"
                    "sweep_seconds: 5\n")
    s = load_alert_settings(str(good))
    assert s.rules.battery_low.warning == 30 and s.rules.battery_low.high == 10
    assert not s.rules.enabled("robot_silent") and s.rules.enabled("robot_fault")
    assert s.sweep_seconds == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  battery_low: {warnng: 30}\n")
    with pytest.raises(ConfigError, match=r"rules\.battery_low\.warnng"):
        load_alert_settings(str(bad))
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_alert_settings(str(tmp_path / "missing.yaml"))


def test_the_example_rules_file_states_the_defaults() -> None:
    example = Path(__file__).resolve().parents[1] / "config.example" / "alert-rules.yaml"
    assert load_alert_settings(str(example)) == load_alert_settings(None)


# -- known or absent facts: no alert opens on a fact not yet reported ----------------------------
#: A stored robot row with every fact any rule reads.
FULL_ROW = {"battery_level": 8, "charge_state": "idle", "is_charging": 0, "status": "idle",
            "move_state": "stuck"}


@pytest.mark.parametrize("name", RULES)
def test_each_rule_decides_only_on_known_facts_or_after_its_window(name: str) -> None:
    rule = Rules().rule(name)
    first = 1000.0
    assert facts_known(rule, FULL_ROW, first, first)  # all known: decides at once
    for group in rule.facts:
        row = {k: v for k, v in FULL_ROW.items() if k not in group}  # this fact missing
        assert not facts_known(rule, row, first, first), (name, group)
        assert facts_known(rule, row, None, first)  # a robot from before first_seen: long ago
        window = rule.absent_after()
        assert window > 0, name
        assert not facts_known(rule, row, first, first + window - 0.1)
        assert facts_known(rule, row, first, first + window)  # then absent, and it decides
    if not rule.facts:  # the message itself is the fact (an event, presence, heartbeat)
        assert facts_known(rule, {}, None, first)


def test_declared_facts_are_what_the_rules_read() -> None:
    r = Rules()
    assert r.battery_low.facts == (("battery_level",), ("charge_state", "is_charging"))
    assert r.robot_offline.facts == (("status",),) and r.robot_stuck.facts == (("move_state",),)
    assert (r.battery_low.absent_after(), r.robot_offline.absent_after(),
            r.robot_stuck.absent_after()) == (300, 600, 120)
    # a charge state known by the status flag alone counts as known
    assert facts_known(r.battery_low, {"battery_level": 50, "is_charging": 1}, 0, 0)
    assert BatteryLow(absent_after_seconds=30).absent_after() == 30


def test_every_rule_has_a_title_for_people() -> None:
    titles = [Rules().rule(name).title for name in RULES]
    assert all(titles) and len(set(titles)) == len(titles)


def test_gateway_clock_opens_on_either_measure_and_resolves_on_both() -> None:
    """Measures: the gateway's verdict and the cloud's (None: not decided yet)."""
    rule = GatewayClock()
    assert clock_severity(rule, [0.0, -400.0], None) == "warning"   # the cloud finds it
    assert clock_severity(rule, [400.0, None], None) == "warning"   # the robots find it
    assert clock_severity(rule, [0.0, -250.0], "warning") == "warning"  # within hysteresis
    assert clock_severity(rule, [0.0, -250.0], None) is None
    assert clock_severity(rule, [0.0, None], "warning") == "warning"  # undecided: held
    assert clock_severity(rule, [0.0, 0.0], "warning") is None
    assert clock_severity(rule, [], "warning") == "warning"   # nothing measured: no change
    assert clock_severity(rule, [None], None) is None
    assert Rules().gateway_clock.cloud_heartbeats == 3
