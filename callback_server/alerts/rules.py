"""The alert rules: their settings (defaults, ``ALERT_RULES_FILE``) and pure decisions.

Nothing here does I/O or reads a clock: each decision takes what was observed, the
severity of the alert already open for that rule and subject (or None) and, where time
matters, ``now``, and says which severity the alert should have (None: no alert). The
engine turns the difference into a transition. So every rule is tested with a clock the
test holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bridge.errors import ConfigError

Severity = Literal["info", "warning", "medium", "high", "critical"]
#: Least to most severe (the event levels of docs/design-contracts.md's normalisation).
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "medium", "high", "critical")
RULES = ("robot_offline", "battery_low", "robot_fault", "robot_stuck", "gateway_offline",
         "gateway_backlog", "robot_silent", "gateway_disk", "poll_failed", "poll_slow",
         "robot_clock", "gateway_clock")
SubjectType = Literal["robot", "gateway"]
SUBJECT_OF: dict[str, SubjectType] = {
    rule: "gateway" if rule.startswith(("gateway", "poll")) else "robot" for rule in RULES}


def rank(severity: str | None) -> int:
    """Order of a severity (-1 for None or one we do not know)."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1


class Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    #: What an operator reads instead of the rule's id.
    title: ClassVar[str] = ""
    #: The robot's stored facts the rule reads, each a group of columns any one of which
    #: makes the fact known. The rule decides nothing while one is unknown, until
    #: ``absent_after()`` seconds after the robot's first message; then a fact still
    #: missing counts as absent (see ``facts_known``). Empty: the message is the fact.
    facts: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def absent_after(self) -> float:
        """How long after a robot's first message a fact it never sent counts as absent."""
        return 0.0


class RobotOffline(Rule):
    """Status ``offline``, or no message for ``silent_seconds``."""

    title: ClassVar[str] = "Robot offline"

    severity: Severity = "high"
    silent_seconds: float = Field(default=600.0, gt=0)

    facts: ClassVar[tuple[tuple[str, ...], ...]] = (("status",),)

    def absent_after(self) -> float:
        return self.silent_seconds


class BatteryLow(Rule):
    """One escalating rule: at or below each threshold while not charging."""

    title: ClassVar[str] = "Battery low"

    warning: float = Field(default=20.0, ge=0, le=100)
    high: float = Field(default=10.0, ge=0, le=100)
    critical: float = Field(default=5.0, ge=0, le=100)
    #: An open alert steps down (or resolves) only above threshold + hysteresis.
    hysteresis: float = Field(default=5.0, ge=0, le=50)
    #: A robot that has sent a level but, this long after its first message, never a
    #: charge state is taken as not charging (its first message alone opens nothing).
    absent_after_seconds: float = Field(default=300.0, ge=0)

    facts: ClassVar[tuple[tuple[str, ...], ...]] = (("battery_level",),
                                                     ("charge_state", "is_charging"))

    def absent_after(self) -> float:
        return self.absent_after_seconds

    @model_validator(mode="after")
    def _ordered(self) -> BatteryLow:
        if not self.critical <= self.high <= self.warning:
            raise ValueError("thresholds must satisfy critical <= high <= warning")
        return self

    def thresholds(self) -> tuple[tuple[Severity, float], ...]:
        """Most severe first."""
        return (("critical", self.critical), ("high", self.high), ("warning", self.warning))


class RobotFault(Rule):
    """An event of one of ``levels``; resolves after ``clear_seconds`` with no new one."""

    title: ClassVar[str] = "Robot fault"

    levels: tuple[Severity, ...] = ("high", "critical")
    clear_seconds: float = Field(default=1800.0, gt=0)


class RobotStuck(Rule):
    title: ClassVar[str] = "Robot stuck"
    severity: Severity = "high"
    for_seconds: float = Field(default=120.0, ge=0)

    facts: ClassVar[tuple[tuple[str, ...], ...]] = (("move_state",),)

    def absent_after(self) -> float:
        return self.for_seconds


class GatewayOffline(Rule):
    title: ClassVar[str] = "Gateway offline"
    severity: Severity = "high"


class GatewayBacklog(Rule):
    """Opens above ``max_age_seconds``; resolves only below it minus ``hysteresis_seconds``,
    so heartbeats of 301, 299, 302 s keep one alert open instead of three."""

    title: ClassVar[str] = "Gateway backlog"

    severity: Severity = "warning"
    max_age_seconds: float = Field(default=300.0, gt=0)
    hysteresis_seconds: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _below(self) -> GatewayBacklog:
        if self.hysteresis_seconds >= self.max_age_seconds:
            raise ValueError("hysteresis_seconds must be below max_age_seconds")
        return self


class GatewayDisk(Rule):
    """The heartbeat's free space on the outbox's filesystem: ``severity`` below
    ``min_free_mb`` (a warning before it is full), ``full_severity`` while the heartbeat
    says the outbox cannot write; resolves above ``min_free_mb + hysteresis_mb``."""

    title: ClassVar[str] = "Gateway disk filling"

    severity: Severity = "warning"
    full_severity: Severity = "critical"
    min_free_mb: float = Field(default=256.0, gt=0)
    hysteresis_mb: float = Field(default=32.0, ge=0)


class RobotClock(Rule):
    """A robot time that was not used (before the product existed, or too far ahead) or
    a confirmed clock reset (bridge/clock.py, noted in the envelope); resolves after
    ``clear_seconds`` without a new one."""

    title: ClassVar[str] = "Robot clock"
    severity: Severity = "warning"
    clear_seconds: float = Field(default=3600.0, gt=0)


class GatewayClock(Rule):
    """Either measure of a gateway's clock beyond ``max_offset_seconds`` either way: the
    heartbeat's ``gateway_clock_offset_s`` (the gateway's clock against its robots', 0
    when it cannot tell: a site with one robot) or the cloud's own (the heartbeat's
    ``timestamp`` against this server's clock, over the last ``cloud_heartbeats`` live
    heartbeats; 0: not used). Resolves when both are back within the bound less
    ``hysteresis_seconds``."""

    title: ClassVar[str] = "Gateway clock"
    severity: Severity = "warning"
    max_offset_seconds: float = Field(default=300.0, gt=0)
    hysteresis_seconds: float = Field(default=60.0, ge=0)
    cloud_heartbeats: int = Field(default=3, ge=0)


class RobotSilent(Rule):
    title: ClassVar[str] = "Robot silent"
    severity: Severity = "warning"
    silent_seconds: float = Field(default=1800.0, gt=0)


class PollFailed(Rule):
    """A gateway's Pudu poll run ended ``failed`` or ``partial`` (some shop or robot could
    not be read: a one-shop run whose every robot failed is partial); its next ``ok`` run
    resolves. ``on_partial: false`` lets partial runs neither open nor resolve."""

    title: ClassVar[str] = "Cloud poll failed"
    severity: Severity = "warning"
    on_partial: bool = True


class PollSlow(Rule):
    """A poll run took longer than ``max_seconds`` (start to end); a quicker run resolves."""

    title: ClassVar[str] = "Cloud poll slow"

    severity: Severity = "warning"
    max_seconds: float = Field(default=240.0, gt=0)  # the replaced pipeline alarmed at 4 min


class Rules(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    robot_offline: RobotOffline = RobotOffline()
    battery_low: BatteryLow = BatteryLow()
    robot_fault: RobotFault = RobotFault()
    robot_stuck: RobotStuck = RobotStuck()
    gateway_offline: GatewayOffline = GatewayOffline()
    gateway_backlog: GatewayBacklog = GatewayBacklog()
    robot_silent: RobotSilent = RobotSilent()
    gateway_disk: GatewayDisk = GatewayDisk()
    poll_failed: PollFailed = PollFailed()
    poll_slow: PollSlow = PollSlow()
    robot_clock: RobotClock = RobotClock()
    gateway_clock: GatewayClock = GatewayClock()

    def enabled(self, rule: str) -> bool:
        return bool(getattr(self, rule).enabled)

    def rule(self, name: str) -> Rule:
        """The settings of the rule called ``name``."""
        rule: Rule = getattr(self, name)
        return rule


class Delivery(BaseModel):
    """Webhook retries: full-jitter exponential back-off, at most ``attempts`` tries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(default=6, ge=1, le=20)
    base_seconds: float = Field(default=1.0, gt=0)
    cap_seconds: float = Field(default=60.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)


class AlertSettings(BaseModel):
    """The whole of ``ALERT_RULES_FILE``; every key optional."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: Rules = Rules()
    #: How often one replica (holding the lease) evaluates the time-based rules.
    sweep_seconds: float = Field(default=15.0, gt=0, le=3600)
    #: Robot messages committed within this long of the last evaluation are evaluated
    #: together when it has passed: a robot heard of several times is read and decided
    #: once. A message after a quiet spell is evaluated at once; 0: after every commit.
    evaluate_seconds: float = Field(default=1.0, ge=0, le=60)
    delivery: Delivery = Delivery()


def load_alert_settings(path: str | None) -> AlertSettings:
    """Defaults, overridden by the YAML file at ``path``; ConfigError naming the key."""
    if not path:
        return AlertSettings()
    try:
        raw: Any = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"ALERT_RULES_FILE {path}: {exc}") from None
    try:
        return AlertSettings.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"ALERT_RULES_FILE {path}: {where}: {first['msg']}") from None


# -- decisions -------------------------------------------------------------------------------
def facts_known(rule: Rule, row: Mapping[str, Any], first_seen: float | None,
                now: float) -> bool:
    """Whether ``rule`` may decide on a robot's stored ``row`` now.

    Yes once every fact it reads is known, or once ``rule.absent_after()`` has passed
    since the robot's first message (``first_seen``; None for a robot known from before
    that was recorded, long ago), when what is still missing counts as absent. So a robot
    whose first message carries a battery level but no charge state opens no
    ``battery_low`` for the split second before its charge state arrives, and one that
    never reports a charge state still gets it.
    """
    for group in rule.facts:  # loops, not nested generators: run per robot per batch
        for column in group:
            if row.get(column) is not None:
                break
        else:
            return first_seen is None or now - first_seen >= rule.absent_after()
    return True


#: Normalised ``charge_state`` values (lower-cased Pudu ``charge_stage``) that count as
#: charging or full; anything else (idle, stop_charge_*, errors) is discharging.
CHARGING_STATES = frozenset({"charging", "charge_full", "charge_full_use_pile"})


def charging(charge_state: str | None, is_charging: bool | None) -> bool:
    """Charging or full, by the normalised charge state (or the status flag)."""
    if charge_state is not None and charge_state.lower() in CHARGING_STATES:
        return True
    return bool(is_charging) and charge_state is None


def battery_severity(rule: BatteryLow, level: float | None, is_charging: bool,
                     current: str | None) -> str | None:
    """The severity ``battery_low`` should have now, given the one open (or None).

    A level is entered at its threshold and left only above threshold + hysteresis, so a
    battery wobbling around 20 % opens one warning and keeps it. Charging or full
    resolves; an unknown level changes nothing.
    """
    if is_charging:
        return None
    if level is None:
        return current
    held = rank(current)
    for severity, threshold in rule.thresholds():
        if level <= threshold or (rank(severity) <= held
                                  and level <= threshold + rule.hysteresis):
            return severity
    return None


def fault_severity(rule: RobotFault, level: str | None, current: str | None) -> str | None:
    """A fault event of a listed level: the open alert takes the higher of the two.
    Other events change nothing (faults resolve by time, ``fault_cleared``)."""
    if level not in rule.levels:
        return current
    return level if rank(level) > rank(current) else current


def fault_cleared(rule: RobotFault, last_fault_at: float, now: float) -> bool:
    return now - last_fault_at >= rule.clear_seconds


def offline_severity(rule: RobotOffline, status: str | None, seen_at: float | None,
                     now: float) -> str | None:
    """Offline by its own status, or not heard of for ``silent_seconds``."""
    silent = seen_at is not None and now - seen_at >= rule.silent_seconds
    return rule.severity if (status or "").lower() == "offline" or silent else None


def silent_severity(rule: RobotSilent, seen_at: float | None, now: float) -> str | None:
    return rule.severity if seen_at is not None and now - seen_at >= rule.silent_seconds \
        else None


def stuck_severity(rule: RobotStuck, stuck_since: float | None, now: float) -> str | None:
    return rule.severity if stuck_since is not None and now - stuck_since >= rule.for_seconds \
        else None


def is_stuck(move_state: str | None) -> bool:
    return (move_state or "").lower() == "stuck"


def gateway_offline_severity(rule: GatewayOffline, presence: str,
                             current: str | None) -> str | None:
    """The last will (or a clean stop) says ``offline``; ``online`` resolves."""
    state = presence.strip().lower()
    if state == "offline":
        return rule.severity
    return None if state == "online" else current


def backlog_severity(rule: GatewayBacklog, oldest_age_s: float | None,
                     current: str | None) -> str | None:
    """The heartbeat's ``outbox_oldest_age_s`` above the bound opens; an open alert stays
    until the age is below the bound minus the hysteresis. A heartbeat without the age
    changes nothing."""
    if oldest_age_s is None:
        return current
    if oldest_age_s > rule.max_age_seconds:
        return rule.severity
    held = current is not None and oldest_age_s >= rule.max_age_seconds - rule.hysteresis_seconds
    return rule.severity if held else None


def clock_severity(rule: GatewayClock, offsets: Sequence[float | None],
                   current: str | None) -> str | None:
    """``offsets``: the measures of the gateway's clock a heartbeat brings (None: one not
    decided yet, which may open nothing it would not open alone and resolves nothing);
    a measure the heartbeat does not bring is left out. Either beyond the bound opens;
    only all within it (less the hysteresis while open) resolve. None at all: no change."""
    known = [abs(o) for o in offsets if o is not None]
    if any(o > rule.max_offset_seconds for o in known):
        return rule.severity
    if current is not None and any(o > rule.max_offset_seconds - rule.hysteresis_seconds
                                   for o in known):
        return rule.severity
    if not known or len(known) < len(offsets):
        return current
    return None


def disk_severity(rule: GatewayDisk, free_bytes: float | None, writable: bool | None,
                  current: str | None) -> str | None:
    """``outbox_writable: false`` in the heartbeat: the disk is full (or failing) now;
    else free space below the bound warns, and an open alert stays until free space is
    above the bound plus the hysteresis. A heartbeat without the figures changes nothing."""
    if writable is False:
        return rule.full_severity
    if free_bytes is None:
        return current
    free_mb = free_bytes / 2**20
    if free_mb < rule.min_free_mb:
        return rule.severity
    held = current is not None and free_mb < rule.min_free_mb + rule.hysteresis_mb
    return rule.severity if held else None


def poll_failed_severity(rule: PollFailed, status: str | None, current: str | None) -> str | None:
    """A run's ``status`` (ok, partial, failed): failed opens, ok resolves; partial opens too
    unless ``on_partial`` is off, then it changes nothing; a run still going changes nothing."""
    if status == "failed" or (status == "partial" and rule.on_partial):
        return rule.severity
    return None if status == "ok" else current


def poll_slow_severity(rule: PollSlow, seconds: float | None, current: str | None) -> str | None:
    """A finished run longer than the bound opens; one within it resolves."""
    if seconds is None:
        return current
    return rule.severity if seconds > rule.max_seconds else None
