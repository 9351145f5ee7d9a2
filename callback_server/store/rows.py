"""Envelopes -> the rows of one batch (pure: no I/O, so it is tested exhaustively).

Values are coerced to what the columns take (strings cut to the column's size, numbers
that are not finite or out of range become NULL, lone surrogates replaced): a batch
the database would refuse is retried forever and stalls the whole stream, so nothing
an envelope can carry may make the database refuse it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.clock import MAX_SKEW_SECONDS, RobotClocks
from bridge.envelope import Envelope
from bridge.errors import TopicError
from bridge.topic import GATEWAY_CHANNELS, ROBOT_CHANNELS, channel_for, scheme_of
from callback_server.store.schema import (
    HISTORY_EVERY_SECONDS,
    LOG,
    OWN_EVENTS,
    RUNS,
    STATE,
    STATE_GROUPS,
    TableSpec,
)

#: A batch item: the MQTT topic it came on and its envelope, or the bare envelope (its
#: topic is then rebuilt as ``org/{org}/device/{device}/{channel}``, without a prefix).
Item = Envelope | tuple[str, Envelope]

_log = logging.getLogger(__name__)

_INT_MAX = 2**31 - 1  # MySQL INT
_TS_MAX = 253402300799.0  # 9999-12-31T23:59:59Z, the end of DATETIME

Limits = Mapping[str, int]  # column -> most characters it takes


def when(ts: float | None) -> str | None:
    """Epoch seconds as a UTC ``DATETIME(3)`` literal both databases take and sort.

    The milliseconds are those of ``datetime.fromtimestamp`` (microseconds rounded half
    to even, then cut), the rest is formatted once a second: strftime for every time of
    every row was ~2.5 µs each, 4 % of the callback server's CPU.
    """
    if ts is None:
        return None
    fraction, whole = math.modf(ts)
    second, micros = int(whole), round(fraction * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    return f"{_second(second)}.{micros // 1000:03d}"


@functools.lru_cache(maxsize=4096)
def _second(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def robot_time(value: Any) -> float | None:
    """A usable epoch-seconds value, or None (NaN, infinities, beyond DATETIME)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= _TS_MAX else None


def text(value: Any, limit: int) -> str | None:
    """A string that encodes as UTF-8 and fits ``limit`` characters; None stays None."""
    if value is None:
        return None
    if type(value) is str and value.isascii() and (not limit or len(value) <= limit):
        return value  # the common case, without the encode check below
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, default=str) \
            if isinstance(value, dict | list) else str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: JSON allows "\udc80", UTF-8 does not
        value = value.encode("utf-8", "replace").decode("utf-8")
    out: str = value
    return out[:limit] if limit and len(out) > limit else out


def key(value: Any, limit: int) -> str:
    """A primary-key string that fits: too long ones are shortened with a hash suffix,
    so two different long keys never collide and the same key always maps the same."""
    out = text(value, 0) or ""
    if len(out) <= limit:
        return out
    digest = hashlib.sha256(out.encode()).hexdigest()
    if limit < 48:
        return digest[:limit]
    return f"{out[:limit - 33]}~{digest[:32]}"


def integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and math.isfinite(value) and abs(value) <= _INT_MAX:
        return int(value)
    if isinstance(value, str):
        try:
            return integer(float(value))
        except ValueError:
            return None
    return None


def percent(value: Any) -> int | None:
    """A 0-100 level; anything else (firmware's 255 for unknown, -5) is not a fact."""
    level = integer(value)
    return level if level is not None and 0 <= level <= 100 else None


def number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def flag(value: Any) -> int | None:
    """0/1 for a TINYINT; Pudu's is_charging is 1 (charging) or -1 (not)."""
    if value is None or isinstance(value, bool):
        return None if value is None else int(value)
    if isinstance(value, str):
        return int(value.strip().lower() in ("1", "true", "yes"))
    as_number = number(value)
    return None if as_number is None else int(as_number > 0)


def _topic_of(env: Envelope, channel: str) -> str:
    """The unprefixed topic a bare envelope stands for (every ingest path has a topic; only
    direct store use passes bare envelopes); empty if its names cannot make one."""
    try:
        return str(scheme_of(env.org).device(env.device, channel))
    except TopicError:
        return ""


def channel_of(topic: str, env: Envelope) -> str:
    """The envelope's channel; else the topic's (``.../device/{id}/{channel...}``); else
    the one its callback type always goes to."""
    if env.channel:
        return env.channel
    parts = topic.split("/")
    for i in range(len(parts) - 3, 1, -1):
        if parts[i] == "device" and parts[i - 2] == "org":
            return "/".join(parts[i + 2:])
    return channel_for(env.type)


def is_robot_channel(channel: str) -> bool:
    """Robot channels feed the robot tables; gateway channels only the raw log."""
    if channel in GATEWAY_CHANNELS:
        return False
    return channel in ROBOT_CHANNELS or channel.startswith("callback/")


def is_robot_state(channel: str, env: Envelope) -> bool:
    """Whether a message is about a robot: by its channel, never by comparing the device
    with the gateway id (a robot may be named like one). Shop-level callbacks (docs/pudu.md:
    mapElementChange has no sn) travel raw on the gateway's topic with no usable sn in
    ``raw``: the edge treats a missing, null or blank sn alike, and so does this."""
    if not is_robot_channel(channel):
        return False
    if channel.startswith("callback/"):
        ext = env.raw.get("extend_info")
        return _serial(env.raw) or (isinstance(ext, dict) and _serial(ext))
    return True


def _serial(obj: Mapping[str, Any]) -> bool:
    """Whether ``obj`` names a robot: an sn the edge routes by (a non-blank string, or
    an integer as some firmware sends)."""
    sn = obj.get("sn")
    if isinstance(sn, str):
        return bool(sn.strip())
    return isinstance(sn, int) and not isinstance(sn, bool)


def state_groups(channel: str, data: Mapping[str, Any],
                 sizes: Mapping[str, int] | None = None) -> dict[str, tuple[Any, ...]]:
    """The latest-state groups one message carries, coerced, in STATE_GROUPS order.

    Cleaning robots never send power or pose callbacks, so battery and position are
    also taken from notifyRobotStatus and robotErrorNotice.extend_info (channel event).
    """
    found: dict[str, tuple[Any, ...]] = {}

    def take(group: str, *values: Any) -> None:
        if any(v is not None for v in values):
            found[group] = values

    size = sizes or _sizes(STATE, None)
    if channel == "status":
        take("status", text(data.get("status"), size["status"]))
        take("charging", flag(data.get("is_charging")))
    if channel in ("status", "power", "event"):
        take("battery", percent(data.get("battery_level")))
    if channel in ("status", "power"):
        take("charge", text(data.get("charge_state"), size["charge_state"]))
    if channel in ("status", "move"):
        take("move", text(data.get("move_state"), size["move_state"]))
    if channel in ("status", "pose", "event"):
        take("map", text(data.get("map_name"), size["map_name"]))
    if channel in ("pose", "event"):
        x, y = number(data.get("x")), number(data.get("y"))
        if x is not None and y is not None:  # a position needs both; z and yaw may lack
            take("pose", x, y, number(data.get("z")), number(data.get("yaw")))
    return found


@dataclass(slots=True)
class _Robot:
    """What a batch says about one robot: per group the newest (ts, order, values)."""

    newest: tuple[float, int] = (-1.0, -1)
    org: str | None = None
    gateway: str | None = None
    groups: dict[str, tuple[float, int, tuple[Any, ...]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchRows:
    """The rows of one batch, each list sorted by primary key (a fixed lock order, so
    concurrent replicas' transactions cannot deadlock on each other's rows)."""

    log: list[tuple[Any, ...]]  # its key is (org_id, id): row[3], row[0]
    events: list[tuple[Any, ...]]
    robots: list[tuple[Any, ...]]
    skewed: int = 0  # messages ordered by ``now`` because their time was too far ahead
    runs: list[tuple[Any, ...]] = field(default_factory=list)  # ingestion_runs rows
    #: History points of replayed state (``replay_points``), sorted by (org, sn, ts).
    history: list[tuple[Any, ...]] = field(default_factory=list)


def _sizes(spec: TableSpec, limits: Limits | None) -> dict[str, int]:
    """Each text column's size, narrowed to ``limits`` (the targets' narrower columns):
    a value is cut to fit them all. Not a key: a key that does not fit is refused, never
    cut (SqlStore.write_batch), as a cut sn would be another robot."""
    sizes = {c.name: c.size for c in spec.columns if c.size}
    keys = {c.name for c in spec.columns if c.kind == "key"}
    for name, limit in (limits or {}).items():
        if name in sizes and name not in keys and limit:
            sizes[name] = min(sizes[name], limit)
    return sizes


def _payload(env: Envelope) -> str:
    """The envelope as stored: strict RFC 8259 JSON, as published."""
    return env.to_json().decode("utf-8", "replace")


def sane_time(env: Envelope, now: float, max_skew: float) -> tuple[float | None, Envelope]:
    """The robot time to order ``env`` by, and the envelope (with a note if it changed).

    A time more than ``max_skew`` ahead of ``now`` would make every later real state
    look older; it is replaced by ``now``, and the note keeps the original value. This
    is checked before the DATETIME range: a ts past year 9999 (or milliseconds from
    another producer, ~1.7e12) is skewed like any other, not silently unordered.
    """
    ahead = _ahead(env.ts, now)
    if ahead is None or ahead <= max_skew:
        return robot_time(env.ts), env
    note = (f"ts: {env.ts!r} is {ahead:.0f} s ahead of the server clock "
            f"(limit {max_skew:g} s); ordered by the server's time")
    _log.warning("message %s of %s/%s: %s", env.id, env.org, env.device, note)
    return now, env.with_notes(note)


def _ordered(clocks: RobotClocks, given: Envelope, env: Envelope,
             now: float) -> tuple[float, Envelope]:
    """The order of a robot's message (bridge/clock.py) and the envelope, noted when its
    robot time was not used as sent (a note of ``sane_time`` already says so)."""
    # a gateway that put its own time in ts says so in a note naming received_at (and
    # makes them equal); an envelope merely without received_at (which then defaults to
    # ts) is timed
    stand_in = given.ts == given.received_at and any(
        "received_at" in n for n in given.notes)
    timed = robot_time(given.ts) is not None and not stand_in
    received = robot_time(given.received_at)
    # deliveries repeat and overtake each other here: the gateway's receive time ranks
    # those without a usable robot time among themselves
    o = clocks.order((given.org, given.device), float(given.ts) if timed else None,
                     now if received is None else received, now,
                     by_received=received is not None)
    if o.note is not None and (o.reset or env is given):
        if o.reset:
            _log.warning("robot %s/%s: %s", given.org, given.device, o.note)
        env = env.with_notes(o.note)
    return o.order, env


def _ahead(ts: Any, now: float) -> float | None:
    """Seconds ``ts`` is ahead of ``now``; None if ``ts`` is no finite number."""
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return None
    try:
        seconds = float(ts)
    except OverflowError:  # an int beyond a double, from direct store use
        return None
    return seconds - now if math.isfinite(seconds) else None


def merges_into_state(env: Envelope) -> bool:
    """Whether a message may change the robot's latest state. A ``replay`` envelope is
    history the edge sent after a newer one of its robot (a drain, newest state first):
    it is logged (and its event kept) but never merged into state; the one
    place the state rows leave such messages out."""
    return not env.replay


def build_rows(items: Sequence[Item], *, now: float,
               limits: Mapping[str, Limits] | None = None,
               max_skew: float = MAX_SKEW_SECONDS, clocks: RobotClocks | None = None) -> BatchRows:
    """Fold a batch into rows: every message logged, every event once, one state row
    per robot holding, per group, the newest values of the batch.

    ``limits`` maps ``"robots"``/``"events"``/``"log"`` to the character limits of
    existing (possibly narrower, legacy) columns. Equal robot times: the later message
    in the batch wins, as a later batch wins over an earlier one. Robot times more than
    ``max_skew`` ahead of ``now`` are ordered as ``now`` (``sane_time``).

    ``clocks`` (the store's, kept across batches) orders robot state by the rule of
    bridge/clock.py: the order is the value the watermarks compare. An envelope whose
    ``ts`` equals its ``received_at`` with a note naming ``received_at`` carries no robot
    time (the gateway put its own).
    """
    lim = limits or {}
    ls, es, rs = _sizes(LOG, lim.get("log")), _sizes(OWN_EVENTS, lim.get("events")), \
        _sizes(STATE, lim.get("robots"))
    stored_at = when(now)
    log: dict[tuple[str, str], tuple[Any, ...]] = {}
    events: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    robots: dict[tuple[str, str], _Robot] = {}
    runs: dict[str, tuple[Any, ...]] = {}
    replayed: list[_Replayed] = []
    skewed = 0
    for order, item in enumerate(items):
        topic, env = item if isinstance(item, tuple) else ("", item)
        channel = channel_of(topic, env)
        topic = topic or _topic_of(env, channel)
        given = env
        ts, sane = sane_time(env, now, max_skew)
        if sane is not env:
            skewed += 1
            env = sane
        if clocks is not None and is_robot_state(channel, env):
            ts, env = _ordered(clocks, given, env, now)
        received = robot_time(env.received_at)
        log_id = key(env.id, ls["id"])
        org = key(env.org, ls["org_id"])
        log.setdefault((org, log_id), (
            log_id, text(topic, ls["topic"]), text(env.type, ls["type"]),
            org, text(env.device, ls["device_id"]),
            text(channel, ls["channel"]), ts, received, stored_at,
            text(_payload(env), ls["payload"]),
        ))
        if channel == "poll":
            row = run_row(env, stored_at)
            if row is not None:
                runs.setdefault(row[0], row)
            continue
        if not is_robot_state(channel, env):
            continue
        sn = key(env.device, min(rs["robot_sn"], es["robot_sn"]))
        data = env.data
        if channel == "event" and data.get("event_id") not in (None, ""):
            event_id = key(data["event_id"], es["event_id"])
            events.setdefault((org, sn, event_id), (
                sn, event_id, text(data.get("event_level"), es["event_level"]),
                text(data.get("event_type"), es["event_type"]),
                text(data.get("event_detail"), es["event_detail"]), when(ts), when(received),
                org, text(env.gateway, es["gateway_id"]),
                text(env.type, es["callback_type"]), ts, text(env.id, es["message_id"]),
            ))
        if ts is None:
            continue  # no usable robot time: it cannot be ordered
        if not merges_into_state(env):
            replayed.append(_Replayed(org, sn, ts, order, text(env.gateway, rs["gateway_id"]),
                                      state_groups(channel, data, rs)))
            continue
        robot = robots.setdefault((org, sn), _Robot(org=org))
        if (ts, order) >= robot.newest:
            robot.newest = (ts, order)
            robot.gateway = text(env.gateway, rs["gateway_id"])
        for group, values in state_groups(channel, data, rs).items():
            held = robot.groups.get(group)
            if held is None or (ts, order) >= held[:2]:
                robot.groups[group] = (ts, order, values)
    robot_rows = []
    for org_sn in sorted(robots):
        sn, r = org_sn[1], robots[org_sn]
        state: list[Any] = []
        marks: list[float | None] = []
        for group, cols in STATE_GROUPS.items():
            kept = r.groups.get(group)
            state.extend(kept[2] if kept else (None,) * len(cols))
            marks.append(kept[0] if kept else None)
        last = r.newest[0]
        robot_rows.append((sn, r.org, r.gateway, *state, *marks, last, when(last)))
    return BatchRows(
        log=[log[k] for k in sorted(log)],
        events=[events[k] for k in sorted(events)],
        robots=robot_rows,
        skewed=skewed,
        runs=[runs[k] for k in sorted(runs)],
        history=replay_points(replayed, stored_at),
    )


@dataclass(frozen=True, slots=True)
class _Replayed:
    """One replayed state message of a batch: its robot, robot time and state groups."""

    org: str
    sn: str
    ts: float
    order: int
    gateway: str | None
    groups: dict[str, tuple[Any, ...]]


#: Where each history column comes from: (state group, index in the group's values).
_POINT = {"status": ("status", 0), "battery_level": ("battery", 0),
          "charge_state": ("charge", 0), "x": ("pose", 0), "y": ("pose", 1),
          "yaw": ("pose", 3), "map_name": ("map", 0)}
_CHANGES = ("status", "charge_state")  # a change of either is a point of its own


def replay_points(replayed: Sequence[_Replayed], recorded_at: str | None,
                  every: float = HISTORY_EVERY_SECONDS) -> list[tuple[Any, ...]]:
    """History points (HISTORY's column order) for the replayed state of one batch.

    Replayed messages never reach the state row, so the live path (a point copied from
    it) never sees them; yet they are the robot's past, sent after its newest state
    during a drain. Per robot in robot-time order, each message's groups update a
    running state, and a point is kept under the live rule: a minute after the previous
    kept point, or at once on a status or charge change. Values the batch never carried
    stay None: the store fills them from the point before (SqlStore), and downsamples
    against the points already stored.
    """
    points: list[tuple[Any, ...]] = []
    robot: tuple[str, str] | None = None
    state: dict[str, Any] = {}
    kept: tuple[float, tuple[Any, ...]] | None = None
    for r in sorted(replayed, key=lambda r: (r.org, r.sn, r.ts, r.order)):
        if (r.org, r.sn) != robot:
            robot, state, kept = (r.org, r.sn), {}, None
        for column, (group, index) in _POINT.items():
            values = r.groups.get(group)
            if values is not None and values[index] is not None:
                state[column] = values[index]
        marks = tuple(state.get(c) for c in _CHANGES)
        point = (r.sn, r.ts, recorded_at, r.org, r.gateway, *(state.get(c) for c in _POINT))
        if kept is not None and kept[0] == r.ts:
            points[-1] = point  # another message at the same robot time: the fuller state
        elif kept is None or r.ts - kept[0] >= every or marks != kept[1]:
            points.append(point)
        else:
            continue
        kept = (r.ts, marks)
    return points


def run_row(env: Envelope, stored_at: str | None) -> tuple[Any, ...] | None:
    """An ``ingestion_runs`` row from a gateway's poll run record (None if it has no id)."""
    d = env.data
    run_id = d.get("run_id")
    if not isinstance(run_id, str | int) or isinstance(run_id, bool) or run_id == "":
        return None
    size = _sizes(RUNS, None)
    started, ended = robot_time(d.get("started_at")), robot_time(d.get("ended_at"))

    def listed(name: str) -> str | None:
        value = d.get(name)
        return text(value if isinstance(value, list) else [], size[name])

    return (
        key(f"{env.org}/{env.device}/{run_id}", size["run_key"]),
        text(env.org, size["org_id"]), text(env.device, size["gateway_id"]),
        text(run_id, size["run_id"]), text(d.get("status"), size["status"]),
        when(started), when(ended), started, listed("shops"), listed("shops_failed"),
        *(integer(d.get(n)) for n in ("robots_seen", "envelopes_published",
                                      "events_backfilled", "api_calls", "api_retries",
                                      "errors")),
        text(d.get("error"), size["error"]), number(d.get("window_start")),
        number(d.get("window_end")), stored_at,
    )
