"""Evaluates the rules against what the server sees and writes the alert transitions.

Three inputs:

- robot messages, after their batch is committed (``observe``): the rules read the
  robot's *stored* latest state, which never moves back in robot time, so messages split
  across replicas by a shared subscription, redelivered or out of order decide the same;
- gateway presence and telemetry (``on_gateway``), which every replica receives on its own
  non-shared subscription: each evaluates, the database's conditional writes let one win;
- the time-based rules (silence, stuck for a while, faults clearing), evaluated by
  ``sweep`` on whichever replica holds a short database lease, so N replicas do it once
  (and were two to hold it at once, the writes are idempotent anyway).

Decisions are made from reads that precede the write, so a replica can act on state
another has just replaced. Robot rules re-check from a fresh read after any transition
they make (``_recheck``), and a fault's time-based resolution is conditional on no fault
since, so neither a stale open nor a stale resolve outlives the evaluation. Gateway rules
are not re-checked: every replica sees every presence and heartbeat in order, so a stale
write is corrected by that replica's next input (at worst an extra open/resolve pair).

Transitions go to ``emit`` (the delivery side). A silenced subject opens no alert; the
transitions of one already open are recorded but not delivered.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bridge import strictjson
from bridge.backoff import backoff_delay
from bridge.envelope import Envelope
from bridge.errors import PayloadError, StoreError
from bridge.service.sdnotify import BEAT_SECONDS
from bridge.service.taskset import within
from bridge.topic import DeviceAddress
from callback_server.alerts.alert import Subject, Transition
from callback_server.alerts.cloud_clock import CloudClock
from callback_server.alerts.rules import (
    AlertSettings,
    GatewayDisk,
    Rule,
    backlog_severity,
    battery_severity,
    charging,
    clock_severity,
    disk_severity,
    facts_known,
    fault_cleared,
    fault_severity,
    gateway_offline_severity,
    is_stuck,
    offline_severity,
    poll_failed_severity,
    poll_slow_severity,
    rank,
    silent_severity,
    stuck_severity,
)
from callback_server.alerts.store import AlertStore, RobotKey
from callback_server.store.rows import channel_of, is_robot_state
from callback_server.times import iso

log = logging.getLogger(__name__)

Emit = Callable[[Transition], None]
#: Inputs held while the database is away, in each queue (robot batches; gateway and
#: poll inputs); past this the oldest are dropped (counted).
MAX_QUEUED = 10_000
SWEEP_LEASE = "alert-sweep"
#: Rules decided from the robot's stored state and watch, re-checked after a transition.
#: An envelope note saying its robot time was not used (bridge/clock.py, normalize, the
#: store's sane_time): what opens ``robot_clock``. "No robot time" alone does not.
_CLOCK_NOTE = re.compile(r"is implausible|clock went back|ahead of the (gateway|server) clock")
STATE_RULES = frozenset({"battery_low", "robot_offline", "robot_silent", "robot_stuck"})
#: Robot messages evaluated at once at most (after an outage, the queue goes in parts).
MAX_MERGED = 5_000
#: Robots of a window read and decided together, between waits for the database. A
#: fleet's 1,000 robots at once held the event loop for tens of milliseconds a window
#: (reading their facts, deciding) and every answer due meanwhile waited: HTTP ingest at
#: 500 POSTs/s, medians of three A/B pairs on a slow host, p99 42 -> 54 ms against
#: windows run back to back; in parts of 250, 52 -> 55 ms and p50 11 -> 8.
ROBOTS_AT_ONCE = 250
#: Robots whose subjects are remembered; past this the memory starts again.
MAX_REMEMBERED = 50_000


@dataclass(slots=True)
class _Robot:
    org: str
    fault: dict[str, Any] | None = None  # the most severe fault event in the batch
    clock: str | None = None  # the last clock note of the batch (bridge/clock.py)
    events: int = 0


Decide = Callable[[str | None], str | None]


@functools.cache  # a handful of severities: one function each, not one per decision
def _const(severity: str | None) -> Decide:
    return lambda held: severity


def _held(held: str | None) -> str | None:
    return held


def _open_only(severity: str | None) -> Decide:
    """A sweep opens (or keeps) but never resolves: a message does that."""
    return lambda held: severity or held


@dataclass(slots=True)
class _Decision:
    subject: Subject
    #: The severity the alert should have, given the open one's (None: none open).
    decide: Decide
    detail: dict[str, Any] = field(default_factory=dict)
    touch: bool = False   # still true: restart time-based clearing (faults)
    #: Resolve only if the condition was last seen before this (a fault since keeps it).
    clear_before: float | None = None


class AlertEngine:
    """The rules applied to messages, presence, telemetry and time."""

    def __init__(self, store: AlertStore, settings: AlertSettings, emit: Emit, *,
                 holder: str, clock: Callable[[], float] = time.time,
                 beat: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.settings = settings
        self.rules = settings.rules
        self.emit = emit
        self.holder = holder
        self.clock = clock
        self.beat = beat
        self.transitions = 0
        self.dropped = 0
        self.sweeps = 0
        #: Gateway and poll inputs, evaluated in order as they come.
        self._queue: collections.deque[tuple[str, Any]] = collections.deque()
        #: Committed robot batches, evaluated together at most every ``evaluate_seconds``.
        self._robots: collections.deque[list[tuple[str, Envelope]]] = collections.deque()
        self._robots_due = 0.0  # monotonic: when robot batches may next be evaluated
        self._wake = asyncio.Event()
        self._robot_subjects: dict[RobotKey, tuple[Subject, Subject, Subject, Subject]] = {}
        #: The cloud's measure of each gateway's clock (``gateway_clock``).
        self.cloud_clock = CloudClock(self.rules.gateway_clock.cloud_heartbeats)

    # -- inputs (sync: called from the writer and the consumer) --------------------------------
    def observe(self, items: Iterable[tuple[str, Envelope]]) -> None:
        """Robot messages whose rows were just committed."""
        robots = [(topic, env) for topic, env in items
                  if is_robot_state(channel_of(topic, env), env)]
        if robots:
            # The loop is woken by the first batch of a window only: it knows when the
            # window ends, and a wake a commit would spin it to no purpose.
            self._put(self._robots, robots, wake=not self._robots)
        for topic, env in items:
            if channel_of(topic, env) == "poll" and env.type == "poll.run":
                self._put(self._queue, ("poll", env))

    def on_gateway(self, address: DeviceAddress, payload: bytes) -> None:
        # The time of receipt, not of evaluation (which a database outage may delay):
        # the cloud's measure of the gateway's clock compares the heartbeat with it.
        if address.channel in ("presence", "telemetry"):
            self._put(self._queue, ("gateway", (address, payload, self.clock())))

    def _put(self, queue: collections.deque[Any], item: Any, *, wake: bool = True) -> None:
        if len(queue) >= MAX_QUEUED:
            queue.popleft()
            self.dropped += 1
        queue.append(item)
        if wake:
            self._wake.set()

    @property
    def pending(self) -> int:
        """Inputs not yet evaluated (they leave the queue only once evaluated)."""
        return len(self._queue) + len(self._robots)

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Evaluate inputs as they come and sweep every ``sweep_seconds``, until cancelled."""
        next_sweep = time.monotonic()
        failures = 0
        while True:
            self.beat()
            due = min(next_sweep, self._robots_due) if self._robots else next_sweep
            wait = max(0.0, min(BEAT_SECONDS, due - time.monotonic()))
            if await within(self._wake.wait(), wait):
                self._wake.clear()
            try:
                await self._drain(robots=time.monotonic() >= self._robots_due)
                if time.monotonic() >= next_sweep:
                    await self.sweep()
                    next_sweep = time.monotonic() + self.settings.sweep_seconds
                failures = 0
            except StoreError as exc:
                failures += 1
                delay = backoff_delay(failures, 0.2, 10.0)
                log.warning("alert evaluation postponed (%s); retrying in %.1f s", exc, delay)
                self.beat()
                await asyncio.sleep(delay)
                self._wake.set()

    async def _drain(self, *, robots: bool = True) -> None:
        """Gateway and poll inputs in order; then, if ``robots``, the robot batches
        queued when the window ended, merged into evaluations of up to ``MAX_MERGED``
        messages. An input leaves its queue only once evaluated, so a database outage
        loses none.

        Batches committed during the evaluation wait for the next window. Evaluated at
        once, each window held only what came during the last one, and a fleet's robots
        were read and decided several times a second (bench pipeline, batch frames,
        1,000 robots: their facts read 42 times in a run instead of 17, the rules'
        statements 75 -> 28 µs of MariaDB's time a row)."""
        while self._queue:
            kind, value = self._queue[0]
            await self._evaluate(kind, 1, self.poll_run(value) if kind == "poll"
                                 else self.gateway(*value))
            self._queue.popleft()
        if not robots or not self._robots:
            return
        self._robots_due = time.monotonic() + self.settings.evaluate_seconds
        window = len(self._robots)
        while window > 0 and self._robots:
            merged: list[tuple[str, Envelope]] = []
            n = 0
            for batch in itertools.islice(self._robots, window):
                if merged and len(merged) + len(batch) > MAX_MERGED:
                    break
                merged += batch
                n += 1
            await self._evaluate("robots", n, self.robots(merged))
            for _ in range(min(n, len(self._robots))):
                self._robots.popleft()
            window -= n

    async def _evaluate(self, kind: str, n: int, evaluation: Awaitable[Any]) -> None:
        try:
            await evaluation
        except StoreError:
            raise  # kept: retried once the database answers
        except Exception:  # a bug: dropping the input beats looping on it forever
            log.exception("alert evaluation of %s failed; %d inputs skipped", kind, n)

    # -- evaluation ----------------------------------------------------------------------------
    async def robots(self, items: Sequence[tuple[str, Envelope]]) -> list[Transition]:
        """Evaluate the event-driven robot rules for the robots of ``items``."""
        now = self.clock()
        seen: dict[RobotKey, _Robot] = {}  # by (org, sn): two orgs may share an sn
        levels = self.rules.robot_fault.levels
        for topic, env in items:
            robot = seen.setdefault((env.org, env.device), _Robot(env.org))
            clock = next((n for n in env.notes if _CLOCK_NOTE.search(n)), None) \
                if env.notes else None
            if clock is not None:
                robot.clock = clock
            level = env.data.get("event_level")
            if channel_of(topic, env) == "event" and level in levels and (
                    robot.fault is None or rank(level) > rank(robot.fault["event_level"])):
                robot.fault = {k: env.data.get(k) for k in
                               ("event_id", "event_level", "event_type", "event_detail")}
        made: list[Transition] = []
        robots = list(seen)
        for i in range(0, len(robots), ROBOTS_AT_ONCE):
            made += await self._some_robots(
                {key: seen[key] for key in robots[i:i + ROBOTS_AT_ONCE]}, now)
        return made

    async def _some_robots(self, seen: dict[RobotKey, _Robot], now: float
                           ) -> list[Transition]:
        """``robots`` for some of a window's robots (a few hundred at most)."""
        facts = await self.store.facts(seen)
        await self.store.watch([(sn, org, is_stuck((facts.get((org, sn)) or {}).get("move_state")))
                                for org, sn in seen], now, facts)
        decisions: list[_Decision] = []
        for (org, sn), robot in seen.items():
            if robot.fault is not None:
                decisions.append(_Decision(
                    Subject("robot_fault", org, "robot", sn),
                    partial(fault_severity, self.rules.robot_fault, robot.fault["event_level"]),
                    robot.fault, touch=True))
            if robot.clock is not None:
                decisions.append(_Decision(
                    Subject("robot_clock", org, "robot", sn),
                    _const(self.rules.robot_clock.severity), {"note": robot.clock},
                    touch=True))
        decisions += self._state_decisions(list(seen), facts, now, heard=True)
        made = await self._apply(decisions, now)
        return made + await self._recheck(made, now, heard=True)

    def _state_decisions(self, robots: Collection[RobotKey],
                         facts: dict[RobotKey, dict[str, Any]], now: float, *,
                         heard: bool) -> list[_Decision]:
        """The rules read from a robot's stored state and watch (``AlertStore.facts``):
        all but ``robot_fault``.
        ``heard``: a message of the robot is being evaluated (so it is not silent).

        Run for every robot of every batch, and nearly always decides "as it was": so a
        detail (only an opening alert records it) is built only for a severity, and the
        subjects are remembered."""
        r = self.rules
        decisions: list[_Decision] = []
        for key in robots:
            row = watch = facts.get(key) or {}
            seen = now if heard or watch.get("seen_at") is None else float(watch["seen_at"])
            first = watch.get("first_seen")
            first = None if first is None else float(first)
            battery, offline, silent, stuck = self._subjects(key)

            def known(rule: Rule, decide: Decide, row: dict[str, Any] = row,
                      first: float | None = first) -> Decide:
                """A fact not yet known (nor yet absent) decides nothing: it stays as is."""
                return decide if facts_known(rule, row, first, now) else _held

            level = row.get("battery_level")
            on_charge = charging(row.get("charge_state"), _flag(row.get("is_charging")))
            decisions.append(_Decision(battery, known(r.battery_low, partial(
                battery_severity, r.battery_low, None if level is None else float(level),
                on_charge)), {"battery_level": level, "charge_state": row.get("charge_state")}))
            severity = offline_severity(r.robot_offline, row.get("status"), seen, now)
            decisions.append(_Decision(offline, known(r.robot_offline, _const(severity)),
                                       {"status": row.get("status")}))
            severity = silent_severity(r.robot_silent, seen, now)
            decisions.append(_Decision(silent, known(r.robot_silent, _const(severity)), {
                "seen_at": iso(seen), "silent_seconds": r.robot_silent.silent_seconds,
            } if severity is not None else {}))
            since = watch.get("stuck_since")
            severity = stuck_severity(r.robot_stuck, None if since is None else float(since),
                                      now)
            decisions.append(_Decision(stuck, known(r.robot_stuck, _const(severity)), {
                "stuck_since": iso(since), "move_state": row.get("move_state"),
            } if severity is not None else {}))
        return decisions

    def _subjects(self, key: RobotKey) -> tuple[Subject, Subject, Subject, Subject]:
        """The state rules' subjects for robot ``key`` (org, sn), made once."""
        made = self._robot_subjects.get(key)
        if made is None:
            if len(self._robot_subjects) >= MAX_REMEMBERED:
                self._robot_subjects.clear()
            org, sn = key
            made = self._robot_subjects[key] = (
                Subject("battery_low", org, "robot", sn),
                Subject("robot_offline", org, "robot", sn),
                Subject("robot_silent", org, "robot", sn),
                Subject("robot_stuck", org, "robot", sn))
        return made

    async def _recheck(self, made: list[Transition], now: float, *,
                       heard: bool) -> list[Transition]:
        """Decide once more, from a fresh read, for the robots whose state-based alert this
        replica just opened, changed or resolved.

        The decision was made from state read before the write; another replica may have
        committed newer state in between and, reading the alert before our write, left
        it alone. Our write precedes this read and its state write preceded its read of
        the alert, so one of the two sees the other: a stale open (or resolve) is undone
        here rather than surviving until the robot's next message.
        """
        robots = {(t.alert.org, t.alert.subject_id) for t in made
                  if t.alert.subject_type == "robot" and t.alert.rule in STATE_RULES}
        if not robots:
            return []
        return await self._apply(self._state_decisions(
            robots, await self.store.facts(robots), now, heard=heard), now)

    async def gateway(self, address: DeviceAddress, payload: bytes,
                      received: float | None = None) -> list[Transition]:
        """Presence (the last will says ``offline``) and telemetry heartbeats; ``received``:
        when this server received it (default: now)."""
        now = self.clock()
        org, gw = address.org_id, address.device_id
        if address.channel == "presence":
            state = payload.decode(errors="replace").strip().lower()[:32]
            return await self._apply([_Decision(
                Subject("gateway_offline", org, "gateway", gw),
                partial(gateway_offline_severity, self.rules.gateway_offline, state),
                {"presence": state})], now)
        try:  # a gateway's heartbeat is outside data: bounded and strict like any other
            beat = strictjson.loads(payload).value
        except PayloadError:
            return []
        age = beat.get("outbox_oldest_age_s") if isinstance(beat, dict) else None
        age = float(age) if isinstance(age, int | float) else None
        depth = beat.get("outbox_depth") if isinstance(beat, dict) else None
        return await self._apply([_Decision(
            Subject("gateway_backlog", org, "gateway", gw),
            partial(backlog_severity, self.rules.gateway_backlog, age),
            {"outbox_oldest_age_s": age, "outbox_depth": depth,
             "max_age_seconds": self.rules.gateway_backlog.max_age_seconds,
             "hysteresis_seconds": self.rules.gateway_backlog.hysteresis_seconds}),
            _disk_decision(self.rules.gateway_disk, org, gw, beat),
            self._clock_decision(org, gw, beat, now if received is None else received)], now)

    async def poll_run(self, env: Envelope) -> list[Transition]:
        """A gateway's Pudu poll run record (its ``poll`` channel): ``poll_failed`` and
        ``poll_slow``, subject the gateway. Records are stored before this, so a replayed
        one decides the same."""
        rec, now = env.data, self.clock()
        status = rec.get("status") if isinstance(rec.get("status"), str) else None
        started, ended = rec.get("started_at"), rec.get("ended_at")
        took = (float(ended) - float(started)
                if isinstance(started, int | float) and isinstance(ended, int | float) else None)
        run = {"run_id": rec.get("run_id"), "status": status, "error": rec.get("error"),
               "shops_failed": rec.get("shops_failed"), "seconds": took}
        gw = env.gateway or env.device
        return await self._apply([
            _Decision(Subject("poll_failed", env.org, "gateway", gw),
                      partial(poll_failed_severity, self.rules.poll_failed, status), run),
            _Decision(Subject("poll_slow", env.org, "gateway", gw),
                      partial(poll_slow_severity, self.rules.poll_slow, took),
                      {**run, "max_seconds": self.rules.poll_slow.max_seconds})], now)

    async def sweep(self) -> bool:
        """The time-based rules, if this replica holds (or takes) the sweep lease."""
        now = self.clock()
        seconds = max(2.5 * self.settings.sweep_seconds, 5.0)
        if not await self.store.lease(SWEEP_LEASE, self.holder, seconds, now):
            return False
        self.sweeps += 1
        r = self.rules
        decisions: list[_Decision] = []
        for rule, silent in (("robot_silent", r.robot_silent.silent_seconds),
                             ("robot_offline", r.robot_offline.silent_seconds)):
            for row in await self.store.quiet_since(now - silent):
                seen = float(row["seen_at"])
                severity = (silent_severity(r.robot_silent, seen, now) if rule == "robot_silent"
                            else offline_severity(r.robot_offline, None, seen, now))
                decisions.append(_Decision(
                    Subject(rule, str(row["org_id"]), "robot", str(row["robot_sn"])),
                    _open_only(severity), {"seen_at": iso(seen), "silent_seconds": silent}))
        for row in await self.store.stuck_since(now - r.robot_stuck.for_seconds):
            since = float(row["stuck_since"])
            decisions.append(_Decision(
                Subject("robot_stuck", str(row["org_id"]), "robot", str(row["robot_sn"])),
                _open_only(stuck_severity(r.robot_stuck, since, now)),
                {"stuck_since": iso(since), "move_state": "stuck"}))
        before = now - r.robot_fault.clear_seconds
        for alert in await self.store.faults_to_clear(before):
            if fault_cleared(r.robot_fault, alert.condition_at or alert.opened_at, now):
                decisions.append(_Decision(alert.subject, _const(None), clear_before=before))
        before = now - r.robot_clock.clear_seconds
        for alert in await self.store.faults_to_clear(before, "robot_clock"):
            decisions.append(_Decision(alert.subject, _const(None), clear_before=before))
        made = await self._apply(decisions, now)
        await self._recheck(made, now, heard=False)
        return True

    def _clock_decision(self, org: str, gw: str, beat: Any, received: float) -> _Decision:
        """gateway_clock from both measures of the gateway's clock: the heartbeat's
        ``gateway_clock_offset_s`` (the edge's verdict: its clock against its robots') and
        the cloud's (``CloudClock``: its ``timestamp`` against ours); the detail says which
        found it wrong."""
        rule = self.rules.gateway_clock
        beat = beat if isinstance(beat, dict) else {}
        edge = beat.get("gateway_clock_offset_s")
        edge = float(edge) if isinstance(edge, int | float) and not isinstance(
            edge, bool) else None
        applies, cloud = self.cloud_clock.measure((org, gw), beat, received)
        offsets = ([edge] if edge is not None else []) + ([cloud] if applies else [])
        found = [name for name, offset in (("robots", edge), ("cloud", cloud))
                 if offset is not None and abs(offset) > rule.max_offset_seconds]
        return _Decision(Subject("gateway_clock", org, "gateway", gw),
                         partial(clock_severity, rule, offsets),
                         {"gateway_clock_offset_s": edge, "cloud_clock_offset_s": cloud,
                          "found_by": found, "max_offset_seconds": rule.max_offset_seconds})

    # -- from decisions to transitions ----------------------------------------------------------
    async def _apply(self, decisions: list[_Decision], now: float) -> list[Transition]:
        decisions = [d for d in decisions if self.rules.enabled(d.subject.rule)]
        if not decisions:
            return []
        current: dict[str, str] = {}
        for i in range(0, len(decisions), 500):
            current |= await self.store.open_severities(d.subject for d in decisions[i:i + 500])
        # Nearly every decision keeps what is open as it is: only those that may change
        # something are looked up for silences.
        acting = []
        for d in decisions:
            held = current.get(d.subject.key)
            severity = d.decide(held)
            if severity != held or d.touch:
                acting.append((d, held, severity))
        silenced: dict[str, float] = {}
        for i in range(0, len(acting), 500):
            silenced |= await self.store.silenced((d.subject for d, _, _ in acting[i:i + 500]),
                                                  now)
        made: list[Transition] = []
        for d, held, severity in acting:
            transition: Transition | None = None
            if severity is None:
                if held is not None:
                    transition = await self.store.resolve(d.subject, now, d.clear_before)
            elif severity != held:
                if held is None and d.subject.key in silenced:
                    continue  # a silenced subject opens nothing
                transition = await self.store.open(d.subject, severity, d.detail, now)
            elif d.touch and not await self.store.touch(d.subject, now) \
                    and d.subject.key not in silenced:
                # Resolved since we read it (a fault sweep): this fault opens a new one.
                transition = await self.store.open(d.subject, severity, d.detail, now)
            if transition is not None:
                if d.subject.key in silenced:
                    transition = Transition(transition.name, transition.alert, transition.id,
                                            silenced=True)
                made.append(transition)
                self.transitions += 1
                log.info("alert %s %s: %s %s/%s (%s)", transition.alert.id, transition.name,
                         d.subject.rule, d.subject.org, d.subject.subject_id,
                         transition.alert.severity)
                self.emit(transition)
        return made


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _disk_decision(rule: GatewayDisk, org: str, gw: str, beat: Any) -> _Decision:
    """gateway_disk from the heartbeat's ``outbox_free_bytes`` and ``outbox_writable``."""
    beat = beat if isinstance(beat, dict) else {}
    free = beat.get("outbox_free_bytes")
    free = float(free) if isinstance(free, int | float) and not isinstance(free, bool) else None
    writable = beat.get("outbox_writable")
    writable = writable if isinstance(writable, bool) else None
    return _Decision(Subject("gateway_disk", org, "gateway", gw),
                     partial(disk_severity, rule, free, writable),
                     {"outbox_free_bytes": free, "outbox_writable": writable,
                      "outbox_error": beat.get("outbox_error"),
                      "min_free_mb": rule.min_free_mb, "hysteresis_mb": rule.hysteresis_mb})
