"""The alert engine against real databases (SQLite and MariaDB), with a clock the test holds.

Two engines on one database stand for two replicas: whichever sees a message, or both,
the alert tables change once and one transition is emitted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest

from bridge.envelope import Envelope
from bridge.topic import DeviceAddress
from callback_server.alerts import AlertEngine, AlertSettings, AlertStore, Transition
from callback_server.alerts import engine as engine_module
from callback_server.alerts.alert import Subject
from callback_server.alerts.rules import RULES
from callback_server.store import SqlStore, open_store
from tests.support.dbutil import query, scans

T0 = 1_750_000_000.0
_ids = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Replica:
    engine: AlertEngine
    emitted: list[Transition] = field(default_factory=list)


@dataclass
class Env:
    store: SqlStore
    alerts: AlertStore
    clock: Clock
    a: Replica
    b: Replica
    url: str
    #: Every transition of both replicas, in the order they were made.
    log: list[Transition] = field(default_factory=list)

    @property
    def emitted(self) -> list[tuple[str, str, str, str]]:
        both = sorted(self.a.emitted + self.b.emitted, key=lambda t: t.alert.updated_at)
        return [(t.name, t.alert.rule, t.alert.subject_id, t.alert.severity) for t in both]

    def of(self, rule: str) -> list[tuple[str, str, str, str]]:
        return [t for t in self.emitted if t[1] == rule]

    def clear(self) -> None:
        self.a.emitted.clear()
        self.b.emitted.clear()

    async def send(self, replica: Replica, sn: str, channel: str, **data: Any) -> None:
        """Commit one robot message (as the batch writer does), then evaluate it."""
        await replica.engine.robots([await self.commit(sn, channel, **data)])

    async def commit(self, sn: str, channel: str, **data: Any) -> tuple[str, Envelope]:
        """Commit one robot message as the batch writer does; the (topic, envelope)."""
        i = next(_ids)
        env = Envelope(id=f"m{i}", type={"event": "robotErrorWarning", "move":
                       "notifyRobotMoveState", "status": "notifyRobotStatus"}.get(
                           channel, "notifyRobotPower"),
                       org="acme", device=sn, gateway="gw1", ts=self.clock.now + i * 1e-3,
                       received_at=self.clock.now, data=data, raw=dict(data), channel=channel)
        item = (f"org/acme/device/{sn}/{channel}", env)
        await self.store.write_batch([item])
        return item

    def rows(self) -> list[dict[str, Any]]:
        return query(self.url, "SELECT rule, subject_id, severity, state FROM alerts "
                     "ORDER BY opened_at, rule")


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[Env]:
    settings = AlertSettings.model_validate({"sweep_seconds": 10})
    clock = Clock()
    async with open_store(db_url) as store:
        await store.migrate()
        alerts = AlertStore(store)
        replicas = []
        log: list[Transition] = []
        for name in ("a", "b"):
            emitted: list[Transition] = []

            def emit(t: Transition, mine: list[Transition] = emitted) -> None:
                mine.append(t)
                log.append(t)

            engine = AlertEngine(alerts, settings, emit, holder=name, clock=clock)
            replicas.append(Replica(engine, emitted))
        yield Env(store, alerts, clock, replicas[0], replicas[1], db_url, log)


async def test_fault_opens_once_across_replicas_and_clears_by_time(env: Env) -> None:
    fatal = {"event_id": "e1", "event_level": "critical", "event_type": "Crash"}
    await env.send(env.a, "R1", "event", **fatal)
    await env.send(env.b, "R1", "event", **{**fatal, "event_id": "e2"})
    await env.send(env.a, "R1", "event", event_id="e3", event_level="warning")
    assert env.of("robot_fault") == [("opened", "robot_fault", "R1", "critical")]
    env.clock.now += 1700
    await env.send(env.b, "R1", "event", event_id="e4", event_level="high")  # restarts clearing
    env.clock.now += 1700
    assert await env.a.engine.sweep()
    assert env.of("robot_fault") == [("opened", "robot_fault", "R1", "critical")]
    env.clock.now += 20
    assert not await env.b.engine.sweep()  # a holds the lease (25 s)
    env.clock.now += 81
    assert await env.a.engine.sweep()
    assert env.of("robot_fault")[-1] == ("resolved", "robot_fault", "R1", "critical")
    assert [r for r in env.rows() if r["rule"] == "robot_fault"] == [
        {"rule": "robot_fault", "subject_id": "R1", "severity": "critical", "state": "resolved"}]
    await env.send(env.b, "R1", "event", event_id="e5", event_level="critical")
    assert [r["state"] for r in env.rows() if r["rule"] == "robot_fault"] == [
        "resolved", "open"]  # a new one, after


async def test_battery_escalates_as_updates_resolves_on_charge_and_does_not_flap(
        env: Env) -> None:
    for replica, level in ((env.a, 22), (env.b, 19), (env.a, 21), (env.b, 19.5), (env.a, 24),
                           (env.b, 9), (env.a, 12), (env.b, 4), (env.a, 4)):
        await env.send(replica, "R2", "power", battery_level=level, charge_state="idle")
        env.clock.now += 1
    assert env.emitted == [("opened", "battery_low", "R2", "warning"),
                           ("severity_changed", "battery_low", "R2", "high"),
                           ("severity_changed", "battery_low", "R2", "critical")]
    assert len(env.rows()) == 1
    await env.send(env.b, "R2", "power", battery_level=4, charge_state="charging")
    assert env.emitted[-1] == ("resolved", "battery_low", "R2", "critical")
    env.clear()
    await env.send(env.a, "R2", "power", battery_level=6, charge_state="charge_full")
    await env.send(env.a, "R2", "power", battery_level=8, charge_state="idle")
    assert env.emitted == [("opened", "battery_low", "R2", "high")]
    assert [r["state"] for r in env.rows()] == ["resolved", "open"]


async def test_silence_keeps_a_subject_quiet_for_its_duration(env: Env) -> None:
    await env.send(env.a, "R3", "power", battery_level=15, charge_state="idle")
    (opened,) = env.a.emitted
    await env.alerts.silence(opened.alert, env.clock.now + 600, "op")
    await env.send(env.b, "R3", "power", battery_level=8, charge_state="idle")
    assert env.b.emitted[-1].name == "severity_changed" and env.b.emitted[-1].silenced
    await env.send(env.a, "R3", "power", battery_level=80, charge_state="charging")
    assert env.a.emitted[-1].name == "resolved" and env.a.emitted[-1].silenced
    await env.send(env.a, "R3", "power", battery_level=8, charge_state="idle")
    assert env.a.emitted[-1].name == "resolved"  # silenced: nothing opened
    assert [r["state"] for r in env.rows()] == ["resolved"]
    env.clock.now += 601
    await env.send(env.b, "R3", "power", battery_level=8, charge_state="idle")
    reopened = env.b.emitted[-1]
    assert reopened.name == "opened" and not reopened.silenced


async def test_silent_offline_and_stuck_open_by_time_once_and_resolve_by_message(
        env: Env) -> None:
    await env.send(env.a, "R4", "status", status="idle")
    await env.send(env.a, "R4", "move", move_state="stuck")
    env.clock.now += 119
    assert await env.a.engine.sweep()
    assert env.emitted == []
    env.clock.now += 1
    await env.b.engine.sweep()  # not the lease holder: does nothing
    await env.a.engine.sweep()
    assert env.emitted == [("opened", "robot_stuck", "R4", "high")]
    await env.send(env.b, "R4", "move", move_state="stuck")  # still stuck: no change
    await env.send(env.b, "R4", "move", move_state="moving")
    assert env.emitted[-1] == ("resolved", "robot_stuck", "R4", "high")
    env.clear()
    env.clock.now += 600
    await env.a.engine.sweep()
    await env.a.engine.sweep()
    assert env.emitted == [("opened", "robot_offline", "R4", "high")]
    env.clock.now += 1200
    await env.a.engine.sweep()
    assert env.emitted[-1] == ("opened", "robot_silent", "R4", "warning")
    await env.send(env.b, "R4", "status", status="idle")
    assert sorted(env.emitted[-2:]) == [("resolved", "robot_offline", "R4", "high"),
                                        ("resolved", "robot_silent", "R4", "warning")]
    env.clear()
    await env.send(env.a, "R4", "status", status="offline")
    assert env.emitted == [("opened", "robot_offline", "R4", "high")]


async def test_the_watch_write_leaves_the_facts_it_hands_back(env: Env) -> None:
    """``AlertStore.watch`` brings the facts it is given to what it wrote rather than
    reading them back: a fresh read must agree, for every kind of robot."""
    await env.send(env.a, "R1", "move", move_state="stuck")  # state and watch: stuck
    await env.send(env.a, "R3", "event", event_id="x1", event_level="info")
    await env.store.write_batch([("org/acme/device/R2/status", Envelope(
        id="r2", type="notifyRobotStatus", org="acme", device="R2", gateway="gw1",
        ts=T0, received_at=T0, data={"status": "idle"}, raw={}, channel="status"))])
    robots = {("acme", sn) for sn in ("R1", "R2", "R3", "R4")}
    before = await env.alerts.facts(robots)
    assert ("acme", "R4") not in before  # never heard of
    assert before[("acme", "R2")]["watched"] == 0  # stored state, never evaluated
    assert before[("acme", "R3")]["watched"] == 1
    env.clock.now += 30
    stuck = {"R1": True, "R2": True, "R3": False, "R4": True}
    await env.alerts.watch([(sn, org, stuck[sn]) for org, sn in sorted(robots)],
                           env.clock.now, before)
    after = await env.alerts.facts(robots)
    read = ("status", "move_state", "seen_at", "stuck_since", "first_seen", "watched")
    assert {k: {c: f.get(c) for c in read} for k, f in before.items()} \
        == {k: {c: f[c] for c in read} for k, f in after.items()}
    assert after[("acme", "R1")]["stuck_since"] == T0  # still stuck since the first
    assert after[("acme", "R4")]["first_seen"] == after[("acme", "R2")]["first_seen"] \
        == T0 + 30
    assert after[("acme", "R3")]["stuck_since"] is None


async def test_the_facts_of_a_batch_are_looked_up_not_scanned(env: Env) -> None:
    """The read the engine makes for every committed batch finds its robots by their
    primary key: a fleet's robot_state and alert_watch are not read whole each time
    (by sn alone MariaDB did, 4,500 rows a read with 1,000 robots)."""
    fleet = [f"F{i:03d}" for i in range(300)]
    await env.store.write_batch([(f"org/acme/device/{sn}/status", Envelope(
        id=f"f-{sn}", type="notifyRobotStatus", org="acme", device=sn, gateway="gw1",
        ts=T0, received_at=T0, data={"status": "idle"}, raw={}, channel="status"))
        for sn in fleet])
    await env.alerts.watch([(sn, "acme", False) for sn in fleet], env.clock.now, {})
    sent: list[tuple[str, list[Any]]] = []
    fetch = env.alerts.backend.fetch

    async def spy(sql: str, args: Any = ()) -> list[dict[str, Any]]:
        sent.append((sql, list(args)))
        return await fetch(sql, args)

    env.alerts.backend.fetch = spy  # type: ignore[method-assign]
    assert set(await env.alerts.facts({("acme", "F007"), ("acme", "F123")})) \
        == {("acme", "F007"), ("acme", "F123")}
    assert len(sent) == 1  # every robot has a state row: the watch is read with it
    wanted = {("acme", "F007"), ("acme", "F123"), ("other", "F007")}
    assert set(await env.alerts.facts(wanted)) == {("acme", "F007"), ("acme", "F123")}
    env.alerts.backend.fetch = fetch  # type: ignore[method-assign]
    assert len(sent) == 3  # then the watch alone, for the one robot without state
    assert sent[2][1] == ["other", "F007"]
    for sql, args in sent:
        assert await scans(env.alerts.backend, sql, args) == []


async def test_a_lapsed_lease_passes_to_another_replica(env: Env) -> None:
    assert await env.a.engine.sweep()
    env.clock.now += 24
    assert not await env.b.engine.sweep()
    env.clock.now += 2  # 25 s lease (2.5 x sweep_seconds) has lapsed: a died
    assert await env.b.engine.sweep()
    assert not await env.a.engine.sweep()


async def test_gateway_last_will_and_backlog_on_every_replica_change_once(env: Env) -> None:
    presence = DeviceAddress("acme", "gw9", "presence")
    telemetry = DeviceAddress("acme", "gw9", "telemetry")
    for replica in (env.a, env.b):  # both receive it: a non-shared subscription
        await replica.engine.gateway(presence, b"offline")
    for replica in (env.a, env.b):
        await replica.engine.gateway(telemetry, b'{"outbox_oldest_age_s": 301.5}')
        await replica.engine.gateway(telemetry, b'{"outbox_depth": 3}')  # no age: no change
    assert env.emitted == [("opened", "gateway_offline", "gw9", "high"),
                           ("opened", "gateway_backlog", "gw9", "warning")]
    for replica in (env.a, env.b):
        await replica.engine.gateway(presence, b"online")
        await replica.engine.gateway(telemetry, b'{"outbox_oldest_age_s": 2}')
        await replica.engine.gateway(telemetry, b"not json")
    assert sorted(env.emitted[2:]) == [("resolved", "gateway_backlog", "gw9", "warning"),
                                       ("resolved", "gateway_offline", "gw9", "high")]
    alert = (await env.alerts.page(limit=10, rule="gateway_offline"))[0][0]
    assert alert.subject == Subject("gateway_offline", "acme", "gateway", "gw9")
    assert alert.as_dict()["state"] == "resolved" and alert.as_dict()["resolved_at"]


async def test_gateway_disk_warns_before_full_and_is_critical_while_unwritable(
        env: Env) -> None:
    await disk(env, 300)  # above the 256 MiB bound: nothing
    assert made(env, "gateway_disk") == []
    await disk(env, 200)
    await disk(env, 0.5, writable=False)  # the outbox refuses writes: escalated
    await disk(env, 0.5)  # no flag (an older agent) but no space: still at least a warning
    await disk(env, 400)
    assert [(t.name, t.alert.severity) for t in env.log if t.alert.rule == "gateway_disk"] == [
        ("opened", "warning"), ("severity_changed", "critical"),
        ("severity_changed", "warning"), ("resolved", "warning")]
    await heartbeat(env, "telemetry", b'{"outbox_depth": 3}')  # no figures: no change
    assert len(made(env, "gateway_disk")) == 4


async def clock_beats(env: Env, offset: float, n: int = 1, *, late: float = 0,
                     robots: float = 0, **extra: Any) -> None:
    """``n`` heartbeats of gateway gs1 whose clock is ``offset`` s off this server's
    (+ ahead), each received ``late`` s after it was sent, saying ``robots`` as the
    gateway's own verdict (0: it cannot tell, a site with one robot)."""
    for _ in range(n):
        env.clock.now += 60
        beat = {"timestamp": int(env.clock.now - late + offset),
                "gateway_clock_offset_s": robots, **extra}
        for replica in (env.a, env.b):  # every replica receives it (non-shared)
            await replica.engine.gateway(DeviceAddress("acme", "gs1", "telemetry"),
                                         json.dumps(beat).encode())


def clock_alerts(env: Env) -> list[tuple[str, Any, Any]]:
    """(transition, found_by, the cloud's offset) of gateway_clock, on either replica."""
    return [(t.name, t.alert.detail.get("found_by"), t.alert.detail.get("cloud_clock_offset_s"))
            for t in env.log if t.alert.rule == "gateway_clock"]


@pytest.mark.parametrize("offset", [-3600, 3600], ids=["behind", "ahead"])
async def test_one_robot_and_a_wrong_gateway_clock_the_cloud_finds_it(
        env: Env, offset: float) -> None:
    """The gateway says 0 (one robot: it cannot tell) while its clock is an hour off: the
    cloud's own measure opens gateway_clock once three live heartbeats agree, and
    resolves once the clock is set right (ahead: once the last heartbeat ahead is older
    than three). A heartbeat is live once it keeps the pace of the one before it."""
    await clock_beats(env, offset, 2)
    assert clock_alerts(env) == []  # the first sets the pace; one live decides nothing
    await clock_beats(env, offset, 2)
    assert clock_alerts(env) == [("opened", ["cloud"], offset)]
    await clock_beats(env, 0)  # the clock set right: a jump, out of pace, not counted
    assert len(clock_alerts(env)) == 1
    await clock_beats(env, 0)
    if offset > 0:  # a late heartbeat never looks ahead: the largest offset of three counts
        assert len(clock_alerts(env)) == 1
        await clock_beats(env, 0, 2)
    assert [name for name, _, _ in clock_alerts(env)] == ["opened", "resolved"]


async def test_late_heartbeats_never_make_a_right_clock_look_wrong(env: Env) -> None:
    """A right gateway clock, heartbeats arriving late: one sent while draining a backlog,
    a redelivered one (the same timestamp, 20 min on), a single live one 10 min late
    among prompt ones, a burst the broker held while this server was away, and a run
    held while the database was away (judged at their receipt, not their evaluation):
    no gateway_clock alert."""
    await clock_beats(env, 0, 3)
    await clock_beats(env, 0, 3, late=900, draining=True)  # a backlog's heartbeats queue
    sent = int(env.clock.now)
    env.clock.now += 1200
    for replica in (env.a, env.b):  # the last heartbeat again, 20 min on (HTTP ingest retry)
        await replica.engine.gateway(DeviceAddress("acme", "gs1", "telemetry"), json.dumps(
            {"timestamp": sent, "gateway_clock_offset_s": 0}).encode())
    await clock_beats(env, 0, late=600)
    await clock_beats(env, 0, 2)
    sent = int(env.clock.now)
    env.clock.now += 900  # the server away 15 min: the broker held 15 heartbeats for it,
    for beat in range(1, 16):  # handed over as the server works through its backlog
        env.clock.now += 40    # (the last three 600-640 s late: "behind", were they live)
        for replica in (env.a, env.b):
            await replica.engine.gateway(DeviceAddress("acme", "gs1", "telemetry"),
                                         json.dumps({"timestamp": sent + 60 * beat,
                                                     "gateway_clock_offset_s": 0}).encode())
    await clock_beats(env, 0, 2)
    telemetry = DeviceAddress("acme", "gs1", "telemetry")
    for _ in range(4):  # received promptly, then held: the database is away for 10 min
        env.clock.now += 60
        env.a.engine.on_gateway(telemetry, json.dumps(
            {"timestamp": int(env.clock.now), "gateway_clock_offset_s": 0}).encode())
    env.clock.now += 600
    await env.a.engine._drain()
    assert clock_alerts(env) == []
    await clock_beats(env, -400, 4)  # and a clock truly off is still found (the first of
    # these, a jump from the right time, out of pace: not counted)
    assert clock_alerts(env) == [("opened", ["cloud"], -400)]


async def test_gateway_clock_resolves_only_when_both_measures_are_within(env: Env) -> None:
    """The gateway's verdict opens it (found by its robots); it stays open while either
    measure is off, and a heartbeat without a timestamp (an older agent) is judged by
    the verdict alone."""
    await clock_beats(env, 0, 3, robots=-400)
    assert clock_alerts(env) == [("opened", ["robots"], None)]  # the cloud: one heartbeat
    await clock_beats(env, -400, 3, robots=-400)
    await clock_beats(env, -400, robots=0)  # the robots find it right, the cloud does not
    assert len(clock_alerts(env)) == 1
    await clock_beats(env, 0)  # set right: a jump, out of pace, not counted
    assert len(clock_alerts(env)) == 1
    await clock_beats(env, 0)
    assert [name for name, _, _ in clock_alerts(env)] == ["opened", "resolved"]
    await heartbeat(env, "telemetry", b'{"gateway_clock_offset_s": 400}')
    await heartbeat(env, "telemetry", b'{"gateway_clock_offset_s": 0}')
    assert [name for name, _, _ in clock_alerts(env)] == ["opened", "resolved", "opened",
                                                          "resolved"]


async def test_acknowledge_once_then_resolve(env: Env) -> None:
    await env.send(env.a, "R5", "event", event_id="x", event_level="high")
    (opened,) = env.a.emitted
    first = await env.alerts.acknowledge(opened.alert.id, "op-a", "on it", env.clock.now)
    second = await env.alerts.acknowledge(opened.alert.id, "op-b", None, env.clock.now)
    assert first is not None and second is None
    assert first.alert.state == "acknowledged" and first.alert.acknowledged_by == "op-a"
    assert first.alert.comment == "on it"
    await env.send(env.b, "R5", "event", event_id="y", event_level="critical")
    assert env.b.emitted[-1].name == "severity_changed"
    assert env.b.emitted[-1].alert.state == "acknowledged"  # still acknowledged


# -- every rule: silence and no flapping, driven through the engine ------------------------------
Step = Callable[[Env], Awaitable[None]]


async def sweep(env: Env, seconds: float = 0) -> None:
    """Let ``seconds`` pass, then both replicas sweep (only the lease holder evaluates)."""
    env.clock.now += seconds
    await env.a.engine.sweep()
    await env.b.engine.sweep()


async def heartbeat(env: Env, channel: str, payload: bytes) -> None:
    """A gateway's presence or telemetry: every replica receives it (non-shared)."""
    env.clock.now += 1
    for replica in (env.a, env.b):
        await replica.engine.gateway(DeviceAddress("acme", "gs1", channel), payload)


async def robot(env: Env, channel: str, replica: str = "a", **data: Any) -> None:
    env.clock.now += 1
    await env.send(env.a if replica == "a" else env.b, "S1", channel, **data)


async def backlog(env: Env, *ages: float) -> None:
    for age in ages:
        await heartbeat(env, "telemetry", b'{"outbox_oldest_age_s": %.1f}' % age)


async def disk(env: Env, *free_mb: float, writable: bool = True) -> None:
    for mb in free_mb:
        await heartbeat(env, "telemetry", json.dumps(
            {"outbox_free_bytes": int(mb * 2**20), "outbox_writable": writable}).encode())


async def battery(env: Env, *levels: float, state: str = "idle") -> None:
    for i, level in enumerate(levels):
        await robot(env, "power", "ab"[i % 2], battery_level=level, charge_state=state)


async def clock_beat(env: Env, *offsets: float) -> None:
    for offset in offsets:
        await heartbeat(env, "telemetry", b'{"gateway_clock_offset_s": %.1f}' % offset)


async def bad_clock(env: Env) -> None:
    """A robot message whose time was not used (as the store notes it)."""
    env.clock.now += 1
    i = next(_ids)
    e = Envelope(id=f"m{i}", type="notifyRobotStatus", org="acme", device="S1",
                 gateway="gw1", ts=env.clock.now, received_at=env.clock.now,
                 data={"status": "idle"}, raw={}, channel="status",
                 notes=("ts: robot time 12.0 is implausible (before 2017-01-01); "
                        "ordered as a message without a robot time",))
    await env.a.engine.robots([("org/acme/device/S1/status", e)])


async def clock_hover(env: Env) -> None:
    for _ in range(3):  # each within clear_seconds of the last
        await bad_clock(env)
        await sweep(env, 3500)
    await sweep(env, 98)                        # 3599 s after the last


@dataclass(frozen=True)
class Drive:
    """How a test makes one rule's condition true (``start``: opens it), false
    (``stop``: resolves it), and hover around its threshold from clear (``hover``: must
    open exactly one alert and never resolve it); ``again``: the condition seen once more
    while it holds (``start`` unless that begins with clearing it)."""

    rule: str
    start: Step
    stop: Step
    hover: Step
    again: Step | None = None


async def offline_hover(env: Env) -> None:
    await robot(env, "status", status="idle")
    await sweep(env, 598)                       # 599 s silent: not yet
    await sweep(env, 1)                         # 600 s: opens
    for _ in range(3):
        await sweep(env, 15)
    await robot(env, "status", "b", status="offline")  # heard of, but offline: still open
    await sweep(env, 600)


async def silent_hover(env: Env) -> None:
    await robot(env, "status", status="idle")
    await sweep(env, 1798)
    await sweep(env, 1)
    for _ in range(3):
        await sweep(env, 15)


async def stuck_hover(env: Env) -> None:
    await robot(env, "move", move_state="stuck")
    await sweep(env, 118)                       # 119 s stuck: not yet
    await sweep(env, 1)
    await robot(env, "move", "b", move_state="stuck")   # still stuck, since the first
    await sweep(env, 15)
    await robot(env, "move", move_state="STUCK")


async def fault_hover(env: Env) -> None:
    for level in ("high", "critical", "high"):  # each within clear_seconds of the last
        await robot(env, "event", event_id=f"h{env.clock.now}", event_level=level)
        await sweep(env, 1700)
    await sweep(env, 98)                        # 1799 s after the last fault


async def quiet_for(env: Env, seconds: float) -> None:
    """A message (status idle), then ``seconds`` of nothing and a sweep."""
    await robot(env, "status", status="idle")
    await sweep(env, seconds)


async def stuck_for(env: Env, seconds: float) -> None:
    await robot(env, "move", move_state="stuck")
    await sweep(env, seconds)


async def presence_wobble(env: Env) -> None:
    for state in (b"offline", b"offline", b"restarting", b"offline"):
        await heartbeat(env, "presence", state)


async def poll_run(env: Env, status: str = "ok", seconds: float = 20) -> None:
    """A gateway's poll run record, committed as the batch writer does, then evaluated."""
    env.clock.now += 1
    i = next(_ids)
    rec = {"run_id": f"r{i}", "status": status, "started_at": env.clock.now - seconds,
           "ended_at": env.clock.now, "error": None if status == "ok" else "API 500"}
    item = ("org/acme/device/gp1/poll", Envelope(
        id=f"run-r{i}", type="poll.run", org="acme", device="gp1", gateway="gp1",
        ts=env.clock.now, received_at=env.clock.now, data=rec, channel="poll", source="poll"))
    await env.store.write_batch([item])
    env.a.engine.observe([item])  # the writer's on_batch hook, as in service.py
    await env.a.engine._drain()


async def poll_runs(env: Env, *runs: tuple[str, float]) -> None:
    for status, seconds in runs:
        await poll_run(env, status, seconds)


DRIVES = [
    Drive("robot_offline", partial(quiet_for, seconds=600),              # opens by time
          lambda e: robot(e, "status", "b", status="idle"), offline_hover,
          lambda e: robot(e, "status", "b", status="offline")),
    Drive("battery_low", lambda e: battery(e, 8),
          lambda e: battery(e, 8, state="charging"),
          lambda e: battery(e, 21, 19, 21, 19.5, 22, 20, 24, 21)),
    Drive("robot_fault",
          lambda e: robot(e, "event", event_id=f"f{e.clock.now}", event_level="high"),
          partial(sweep, seconds=1800), fault_hover),                    # resolves by time
    Drive("robot_stuck", partial(stuck_for, seconds=120),
          lambda e: robot(e, "move", "b", move_state="moving"), stuck_hover,
          lambda e: robot(e, "move", "b", move_state="stuck")),
    Drive("gateway_offline", lambda e: heartbeat(e, "presence", b"offline"),
          lambda e: heartbeat(e, "presence", b"online"), presence_wobble),
    Drive("gateway_backlog", lambda e: backlog(e, 400), lambda e: backlog(e, 10),
          lambda e: backlog(e, 301, 299, 302, 298, 303, 241, 300)),
    Drive("robot_silent", partial(quiet_for, seconds=1800),
          lambda e: robot(e, "status", "b", status="idle"), silent_hover,
          partial(sweep, seconds=600)),
    Drive("gateway_disk", lambda e: disk(e, 100), lambda e: disk(e, 1024),
          lambda e: disk(e, 250, 260, 240, 280, 255, 287, 257)),
    Drive("poll_failed", partial(poll_run, status="failed"), poll_run,
          lambda e: poll_runs(e, ("failed", 5), ("partial", 5), ("failed", 5), ("partial", 5))),
    Drive("poll_slow", partial(poll_run, seconds=900), poll_run,
          lambda e: poll_runs(e, ("ok", 601), ("failed", 700), ("partial", 650))),
    Drive("robot_clock", bad_clock, partial(sweep, seconds=3600), clock_hover),
    Drive("gateway_clock", lambda e: clock_beat(e, -3600), lambda e: clock_beat(e, 0),
          lambda e: clock_beat(e, -301, -299, 302, -260, -303, 241, -300)),
]
assert {d.rule for d in DRIVES} == set(RULES)


def made(env: Env, rule: str, since: int = 0) -> list[tuple[str, bool]]:
    """(transition, silenced) of ``rule`` made by either replica since ``since``."""
    return [(t.name, t.silenced) for t in env.log[since:] if t.alert.rule == rule]


def open_rows(env: Env, rule: str) -> int:
    return sum(r["state"] != "resolved" for r in env.rows() if r["rule"] == rule)


@pytest.mark.parametrize("drive", DRIVES, ids=lambda d: d.rule)
async def test_each_rule_opens_once_and_resolves(env: Env, drive: Drive) -> None:
    await drive.start(env)
    assert made(env, drive.rule) == [("opened", False)]
    await (drive.again or drive.start)(env)  # the condition seen again
    assert made(env, drive.rule) == [("opened", False)]
    await drive.stop(env)
    assert made(env, drive.rule) == [("opened", False), ("resolved", False)]
    assert open_rows(env, drive.rule) == 0


@pytest.mark.parametrize("drive", DRIVES, ids=lambda d: d.rule)
async def test_each_rule_does_not_flap_around_its_threshold(env: Env, drive: Drive) -> None:
    await drive.hover(env)
    opened = [name for name, _ in made(env, drive.rule)]
    assert opened[0] == "opened" and set(opened[1:]) <= {"severity_changed"}, opened
    assert open_rows(env, drive.rule) == 1
    assert len([r for r in env.rows() if r["rule"] == drive.rule]) == 1


@pytest.mark.parametrize("drive", DRIVES, ids=lambda d: d.rule)
async def test_each_rule_respects_silence(env: Env, drive: Drive) -> None:
    await drive.start(env)
    (opened,) = [t for t in env.log if t.alert.rule == drive.rule]
    until = env.clock.now + 4 * 3600
    await env.alerts.silence(opened.alert, until, "op")
    mark = len(env.log)
    await drive.stop(env)
    assert made(env, drive.rule, mark) == [("resolved", True)]  # recorded, not delivered
    mark = len(env.log)
    await drive.start(env)
    assert made(env, drive.rule, mark) == []  # silenced: nothing opens
    assert open_rows(env, drive.rule) == 0
    env.clock.now = until + 1
    await drive.stop(env)
    await drive.start(env)
    assert made(env, drive.rule, mark) == [("opened", False)]


async def test_a_partial_run_opens_poll_failed_and_an_ok_run_resolves_it(env: Env) -> None:
    await poll_run(env, "partial")
    assert made(env, "poll_failed") == [("opened", False)]
    await poll_run(env, "failed")  # still the one alert
    await poll_run(env, "ok")
    assert made(env, "poll_failed") == [("opened", False), ("resolved", False)]


# -- a replica acting between another's read and its write ----------------------------------
class Interleaved(AlertStore):
    """An alert store whose next write (open, resolve, touch) first runs ``meanwhile``:
    another replica acting between this replica's reads and its write."""

    meanwhile: Callable[[], Awaitable[object]] | None = None

    async def _first(self) -> None:
        hook, self.meanwhile = self.meanwhile, None
        if hook is not None:
            await hook()

    async def open(self, *args: Any, **kwargs: Any) -> Transition | None:
        await self._first()
        return await super().open(*args, **kwargs)

    async def resolve(self, *args: Any, **kwargs: Any) -> Transition | None:
        await self._first()
        return await super().resolve(*args, **kwargs)

    async def touch(self, *args: Any, **kwargs: Any) -> bool:
        await self._first()
        return await super().touch(*args, **kwargs)


def interleaved(env: Env) -> tuple[Replica, Interleaved]:
    """A third replica, ``c``, whose writes can be delayed behind another's."""
    store = Interleaved(env.store)
    emitted: list[Transition] = []

    def emit(t: Transition) -> None:
        emitted.append(t)
        env.log.append(t)

    engine = AlertEngine(store, env.a.engine.settings, emit, holder="c", clock=env.clock)
    return Replica(engine, emitted), store


async def test_a_stale_decision_is_undone_by_the_replica_that_wrote_it(env: Env) -> None:
    c, store = interleaved(env)
    power = partial(env.send, sn="R7", channel="power")
    # c read 8 % discharging; before it opens, b commits "charging" and, finding no alert
    # open, does nothing. c's open is stale: its re-check resolves it.
    store.meanwhile = partial(power, env.b, battery_level=8, charge_state="charging")
    await power(c, battery_level=8, charge_state="idle")
    assert made(env, "battery_low") == [("opened", False), ("resolved", False)]
    assert open_rows(env, "battery_low") == 0
    # The other way round: c read "charging" and resolves; meanwhile b commits 8 % idle and,
    # finding the alert open at high, does nothing. c's re-check opens it again.
    await power(env.a, battery_level=8, charge_state="idle")
    mark = len(env.log)
    store.meanwhile = partial(power, env.b, battery_level=8, charge_state="idle")
    await power(c, battery_level=9, charge_state="charging")
    assert made(env, "battery_low", mark) == [("resolved", False), ("opened", False)]
    assert open_rows(env, "battery_low") == 1


async def test_a_fault_between_the_sweeps_read_and_its_resolve_keeps_the_alert(
        env: Env) -> None:
    c, store = interleaved(env)
    fault = partial(env.send, sn="R8", channel="event", event_level="high")
    await fault(env.a, event_id="f1")
    env.clock.now += 1800
    # c's sweep found the fault quiet for 30 min; b records a new one before c resolves.
    store.meanwhile = partial(fault, env.b, event_id="f2")
    assert await c.engine.sweep()
    assert made(env, "robot_fault") == [("opened", False)]
    assert open_rows(env, "robot_fault") == 1
    # c read the alert open for a new fault; before its touch, a sweep resolved the alert
    # (30 min since f2): the new fault opens a new one rather than touching nothing.
    env.clock.now += 1800
    store.meanwhile = partial(c.engine.sweep)
    await fault(c, event_id="f3")
    assert made(env, "robot_fault") == [("opened", False), ("resolved", False),
                                        ("opened", False)]
    assert open_rows(env, "robot_fault") == 1


async def test_a_sweep_that_raced_a_message_undoes_what_it_opened(env: Env) -> None:
    c, store = interleaved(env)
    await env.send(env.a, "R9", "status", status="idle")
    env.clock.now += 1800
    # c's sweep read R9 quiet for 30 min; before it opens, b commits a message of R9 and,
    # finding nothing open, does nothing. c's re-check reads the watch and resolves.
    store.meanwhile = partial(env.send, env.b, "R9", "status", status="idle")
    assert await c.engine.sweep()
    for rule in ("robot_silent", "robot_offline"):
        assert made(env, rule) == [("opened", False), ("resolved", False)], rule
        assert open_rows(env, rule) == 0


async def test_robot_batches_within_the_window_are_evaluated_together(env: Env) -> None:
    """Under load the robot rules run once a window (``evaluate_seconds``) on every batch
    committed in it, a robot read and decided once; after a quiet spell, at once."""
    evaluated: list[int] = []
    made: list[Transition] = []
    changed = asyncio.Event()

    def emit(t: Transition) -> None:
        made.append(t)
        changed.set()

    settings = AlertSettings.model_validate({"evaluate_seconds": 1.5})
    engine = AlertEngine(env.alerts, settings, emit, holder="w", clock=env.clock)
    evaluate = engine.robots

    async def counted(items: Any) -> list[Transition]:
        evaluated.append(len(items))
        return await evaluate(items)

    engine.robots = counted  # type: ignore[method-assign]
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(engine.run(), name="alert-engine")
        sent = time.monotonic()
        engine.observe([await env.commit("W1", "power", battery_level=4, charge_state="idle")])
        await asyncio.wait_for(changed.wait(), 10)
        first = time.monotonic() - sent
        changed.clear()
        for level in (30, 60, 90):  # three commits in the window: the last one decides
            env.clock.now += 1
            engine.observe([await env.commit("W1", "power", battery_level=level,
                                             charge_state="idle"),
                            await env.commit("W2", "power", battery_level=level,
                                             charge_state="idle")])
        await asyncio.wait_for(changed.wait(), 10)
        second = time.monotonic() - sent
        run.cancel()
    assert [(t.name, t.alert.subject_id) for t in made] == [
        ("opened", "W1"), ("resolved", "W1")]
    assert evaluated == [1, 6]  # not one evaluation a commit
    assert first < 1.5 <= second  # the lone message at once; the rest when the window ended


async def test_batches_committed_during_an_evaluation_wait_for_the_next_window(
        env: Env) -> None:
    """Under a steady stream, what is committed while a window is being evaluated waits
    for the next window. Evaluated as soon as the last one ended (as it once was), each
    window held only what came during one evaluation, and a fleet's robots were read
    and decided again several times a second."""
    evaluations: list[tuple[float, int]] = []  # (start, messages)
    inside, release, second = asyncio.Event(), asyncio.Event(), asyncio.Event()
    settings = AlertSettings.model_validate({"evaluate_seconds": 1.0})
    engine = AlertEngine(env.alerts, settings, lambda t: None, holder="w", clock=env.clock)
    evaluate = engine.robots

    async def slow(items: Any) -> list[Transition]:
        evaluations.append((time.monotonic(), len(items)))
        if len(evaluations) == 1:
            inside.set()
            await release.wait()  # the database takes its time; batches keep coming
        made = await evaluate(items)
        if len(evaluations) == 2:
            second.set()
        return made

    engine.robots = slow  # type: ignore[method-assign]
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(engine.run(), name="alert-engine")
        engine.observe([await env.commit("N1", "power", battery_level=50)])
        await asyncio.wait_for(inside.wait(), 10)
        for sn in ("N2", "N3"):
            engine.observe([await env.commit(sn, "power", battery_level=50)])
        release.set()
        await asyncio.wait_for(second.wait(), 10)
        run.cancel()
    assert [n for _, n in evaluations] == [1, 2] and engine.pending == 0
    # the next window opens evaluate_seconds after the last one began, not when it ended
    assert evaluations[1][0] - evaluations[0][0] >= 1.0 - 0.05


async def test_a_large_window_is_decided_a_few_hundred_robots_at_a_time(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet's window is read and decided in parts, each after a wait for the
    database: at once, 1,000 robots held the event loop for tens of milliseconds, and
    every HTTP answer due meanwhile waited. Every robot is still decided."""
    monkeypatch.setattr(engine_module, "ROBOTS_AT_ONCE", 2)
    sizes: list[int] = []
    facts = env.alerts.facts

    async def spy(robots: Any) -> Any:
        sizes.append(len(robots))
        return await facts(robots)

    env.alerts.facts = spy  # type: ignore[method-assign]
    items = [await env.commit(f"L{i}", "power", battery_level=4, charge_state="idle")
             for i in range(5)]
    made = await env.a.engine.robots(items)
    assert sizes == [2, 2, 2, 2, 1, 1]  # each part's read, then its re-check (it opened)
    assert sorted(t.alert.subject_id for t in made if t.name == "opened") == \
        [f"L{i}" for i in range(5)]


async def test_a_shop_level_callback_on_the_gateways_topic_is_no_robot(env: Env) -> None:
    # mapElementChange has no sn: it travels raw on the gateway's own topic and must not
    # make the gateway a watched robot (it would go "silent" and "offline" as one); a
    # robot named like the gateway is one.
    def message(channel: str, raw: dict[str, Any]) -> tuple[str, Envelope]:
        env_ = Envelope(id=f"s{next(_ids)}", type="mapElementChange" if channel.startswith(
            "callback/") else "notifyRobotPower", org="acme", device="gw1", gateway="gw1",
            ts=T0, received_at=T0, data={}, raw=raw, channel=channel)
        return f"org/acme/device/gw1/{channel}", env_

    engine = env.a.engine
    engine.observe([message("callback/mapElementChange", {"shop_id": 7}),
                    message("callback/mapElementChange", {"sn": " "})])
    assert engine.pending == 0
    engine.observe([message("power", {"sn": "gw1", "power": 50})])
    assert engine.pending == 1


# -- no alert on facts not yet known --------------------------------------------------------------
async def test_a_first_message_without_charge_state_opens_nothing(env: Env) -> None:
    """The audit's 13 charging robots: their first message had a level and no charge state,
    and each opened battery_low for 0.1 s (delivered to every alert webhook)."""
    await env.send(env.a, "C1", "power", battery_level=4)
    env.clock.now += 0.1
    await env.send(env.b, "C1", "power", battery_level=4, charge_state="charging")
    assert env.emitted == [] and env.rows() == []
    # a robot that never reports a charge state is taken as not charging after the window
    await env.send(env.a, "C2", "power", battery_level=8)
    env.clock.now += 299
    await env.send(env.b, "C2", "power", battery_level=8)
    assert env.emitted == []
    env.clock.now += 1
    await env.send(env.a, "C2", "power", battery_level=8)
    assert env.emitted == [("opened", "battery_low", "C2", "high")]
    # the charging flag of a status message makes the charge known at once
    env.clear()
    await env.send(env.a, "C3", "status", status="idle", battery_level=3, is_charging=True)
    await env.send(env.a, "C4", "status", status="idle", battery_level=3, is_charging=False)
    assert env.emitted == [("opened", "battery_low", "C4", "critical")]


async def test_a_robot_never_reporting_status_or_move_state_is_judged_by_time(
        env: Env) -> None:
    await env.send(env.a, "Q1", "power", battery_level=80, charge_state="idle")
    await sweep(env, 599)
    assert env.of("robot_offline") == [] and env.of("robot_stuck") == []
    await sweep(env, 1)  # silent for robot_offline's window: offline, status or not
    assert env.of("robot_offline") == [("opened", "robot_offline", "Q1", "high")]
    await env.send(env.b, "Q1", "power", battery_level=80, charge_state="idle")
    assert env.of("robot_offline")[-1][0] == "resolved" and env.of("robot_stuck") == []


async def test_two_orgs_robots_with_one_sn_in_one_batch_are_judged_apart(env: Env) -> None:
    def message(org: str, channel: str, **data: Any) -> tuple[str, Envelope]:
        i = next(_ids)
        e = Envelope(id=f"m{i}", type="robotErrorWarning" if channel == "event"
                     else "notifyRobotPower", org=org, device="R7", gateway=f"gw-{org}",
                     ts=env.clock.now + i * 1e-3, received_at=env.clock.now, data=data,
                     raw=dict(data), channel=channel)
        return (f"org/{org}/device/R7/{channel}", e)

    batch = [message("acme", "power", battery_level=5, charge_state="idle"),
             message("beta", "power", battery_level=90, charge_state="idle"),
             message("beta", "event", event_id="e1", event_level="critical",
                     event_type="Crash")]
    await env.store.write_batch(batch)
    await env.a.engine.robots(batch)
    opened = {(t.alert.rule, t.alert.org, t.alert.subject_id) for t in env.log
              if t.name == "opened"}
    # acme's R7 is low (beta's 90 % is not read for it); only beta's R7 faulted
    assert opened == {("battery_low", "acme", "R7"), ("robot_fault", "beta", "R7")}


async def test_clock_rules_gateway_from_the_heartbeat_robot_from_the_notes(env: Env) -> None:
    telemetry = DeviceAddress("acme", "gw1", "telemetry")
    await env.a.engine.gateway(telemetry, b'{"gateway_clock_offset_s": -3600.2}')
    await env.a.engine.gateway(telemetry, b'{"outbox_depth": 3}')  # no figure: no change
    assert env.of("gateway_clock") == [("opened", "gateway_clock", "gw1", "warning")]
    await env.a.engine.gateway(telemetry, b'{"gateway_clock_offset_s": 0}')
    assert env.of("gateway_clock")[-1][0] == "resolved"
    # a robot message whose time was not used (noted by the store's ordering) opens
    # robot_clock; it clears by time, like a fault
    i = next(_ids)
    noted = Envelope(id=f"m{i}", type="notifyRobotStatus", org="acme", device="R5",
                     gateway="gw1", ts=env.clock.now, received_at=env.clock.now,
                     data={"status": "idle"}, raw={}, channel="status",
                     notes=("ts: robot time 12.0 is implausible (before 2017-01-01); "
                            "ordered as a message without a robot time",))
    await env.a.engine.robots([("org/acme/device/R5/status", noted)])
    assert env.of("robot_clock") == [("opened", "robot_clock", "R5", "warning")]
    env.clock.now += RULES_CLEAR + 1
    await env.a.engine.sweep()
    assert env.of("robot_clock")[-1][0] == "resolved"


RULES_CLEAR = 3600.0


async def test_an_untimed_message_alone_does_not_open_robot_clock(env: Env) -> None:
    i = next(_ids)
    e = Envelope(id=f"m{i}", type="notifyRobotStatus", org="acme", device="R6",
                 gateway="gw1", ts=env.clock.now, received_at=env.clock.now,
                 data={"status": "idle"}, raw={}, channel="status",
                 notes=("ts: no robot time in the callback; received_at stands in",))
    await env.a.engine.robots([("org/acme/device/R6/status", e)])
    assert env.of("robot_clock") == []
