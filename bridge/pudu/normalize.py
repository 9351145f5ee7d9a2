"""Pudu callback -> channel, device, robot time and normalised fields (pure, no I/O).

Liberal where the meaning is clear (docs/pudu.md: vendor examples are not always valid wire
bodies): case-insensitive types and values, numeric strings, ``charge_state`` as an
alias of ``charge_stage``, keys with a stray trailing colon, millisecond timestamps.
Precise where it is not: every refusal is an ``InputError`` naming the field, because
Pudu retries a refused callback at most 3 times and then drops it, so the operator has
to be able to see at once what was wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from bridge.clock import MAX_SKEW_SECONDS
from bridge.errors import InputError, MalformedBodyError
from bridge.strictjson import SAFE_INT
from bridge.topic import CHANNEL_OF_TYPE, MAX_SN_BYTES, channel_for, refused_character

__all__ = [
    "CHANNELS",
    "COMPACTABLE",
    "DEFAULT_MAX_SKEW",
    "DOCUMENTED_TYPES",
    "MS_THRESHOLD",
    "Normalized",
    "normalize",
    "to_seconds",
]

#: Every callback type docs/pudu.md documents, in its documented casing.
DOCUMENTED_TYPES: Final[tuple[str, ...]] = (
    "robotStatus", "notifyRobotStatus", "robotErrorWarning", "robotErrorNotice",
    "notifyRobotPower", "notifyRobotPose", "notifyRobotMoveState", "notifyCleanStatus",
    "TASK_STATUS", "robotBinding", "robotUnBinding", "robotActivate", "robotEmergencyRecover",
    "mapElementChange", "notifySwitchMap", "notifyCustomCall", "notifyRobotOrderState",
    "robotDeliveryStatus", "notifyTransportTask", "notifyDeliveryTask", "notifyErrandStatus",
    "notifyLiftingTask", "notifyLiftingStatus", "notifyCruiseTask", "notifyDoorsState",
    "notifyElevatorUtilizeState", "notifyQrCodeContent", "notifyRechargeStatus",
    "notifySwipeCard",
)
_CANONICAL: Final = {t.lower(): t for t in DOCUMENTED_TYPES}

#: Types with a dedicated channel (bridge.topic, the one table); others -> callback/{type}.
CHANNELS: Final[dict[str, str]] = CHANNEL_OF_TYPE
#: Only the latest state of these matters, so a full outbox may drop superseded entries.
COMPACTABLE: Final = frozenset({"pose", "power"})

# docs/pudu.md severity map; the seed-style upper-case names map to themselves.
_LEVELS: Final = {
    "fatal": "critical", "error": "high", "warning": "warning", "event": "info",
    "critical": "critical", "high": "high", "medium": "medium", "info": "info",
    "warn": "warning",
}
_DEFAULT_LEVEL: Final = "medium"

#: How far ahead of the receiving clock a robot time may be (MAX_CLOCK_SKEW_SECONDS).
DEFAULT_MAX_SKEW: Final = MAX_SKEW_SECONDS
#: Seconds reach 1e11 only in the year 5138, so anything above is milliseconds.
MS_THRESHOLD: Final = 1e11
# One safe MQTT topic level: no '/', '+', '#', '$' tricks, and short.
_TYPE_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_BAD_SN_CHARS: Final = ("/", "+", "#")
# mnt_robot_events.event_id is VARCHAR(128); a longer error_id is hashed to fit.
_MAX_EVENT_ID: Final = 128
_ID_HEX: Final = 32


@dataclass(frozen=True, slots=True)
class Normalized:
    """One accepted callback, ready to be wrapped in an ``Envelope``.

    ``device_id`` is None for shop-level callbacks without ``sn``: the caller routes those
    to the gateway's own topic. ``message_id`` is stable for a retried identical callback.
    """

    callback_type: str
    channel: str
    device_id: str | None
    ts: float
    message_id: str
    data: dict[str, Any]
    raw: dict[str, Any]
    compact_key: str | None
    #: What was left out or changed to keep the envelope truthful (see ``Envelope.notes``).
    notes: tuple[str, ...] = ()
    #: The robot time was too far ahead of the gateway clock; ``ts`` is ``received_at``.
    skewed: bool = False
    #: Its note, among ``notes`` (not the last: the fields' own notes follow it).
    skew_note: str | None = None
    #: The robot's own time as sent (seconds), whatever its plausibility; None: none.
    robot_ts: float | None = None


def to_seconds(value: float) -> float:
    """Seconds from a Pudu timestamp given in seconds or milliseconds."""
    return value / 1000.0 if value > MS_THRESHOLD else float(value)


def _show(value: Any) -> str:
    """A short repr for error messages: the body may be large and is not ours to echo."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value: Any) -> str:
    return {bool: "a boolean", dict: "an object", list: "an array"}.get(
        type(value), type(value).__name__
    )


def _clean_keys(obj: dict[Any, Any]) -> dict[Any, Any]:
    """``{"sn:": 1}`` -> ``{"sn": 1}`` (a stray colon in vendor examples); exact keys win.

    ``obj`` itself when no key has one (nearly every body): the copy was ~1.4 µs of
    each of a callback's two or three objects, and nothing here writes to it."""
    for key in obj:
        if isinstance(key, str) and key.endswith(":"):
            break
    else:
        return obj
    out = {k: v for k, v in obj.items() if not (isinstance(k, str) and k.endswith(":"))}
    for key, value in obj.items():
        if isinstance(key, str) and key.endswith(":"):
            out.setdefault(key.rstrip(":"), value)
    return out


class _Reader:
    """Typed reads from one JSON object; a refusal names the field by its dotted path.

    Null and blank strings read as absent: an empty value carries no meaning and must not
    overwrite stored state downstream (the raw object still has it).
    """

    __slots__ = ("_data", "_path", "notes")

    def __init__(self, obj: dict[Any, Any], path: str, notes: list[str] | None = None) -> None:
        self._data = _clean_keys(obj)
        self._path = path
        self.notes: list[str] = [] if notes is None else notes

    def field(self, key: str) -> str:
        return f"{self._path}.{key}"

    def raw(self, key: str) -> Any:
        value = self._data.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    def number(self, key: str) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        name = self.field(key)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InputError(f"{name} must be a number, got {_kind(value)}", field=name)
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise InputError(f"{name} must be a number, got {_show(value)}", field=name) from None
        if not math.isfinite(number):
            raise InputError(f"{name} must be a finite number, got {_show(value)}", field=name)
        return number

    def integer(self, key: str) -> int | None:
        """An integer, or None (noted) beyond ±2^53, where JSON consumers lose exactness."""
        number = self.number(key)
        if number is None:
            return None
        if abs(number) > SAFE_INT:
            self.notes.append(f"{self.field(key)}: {_show(number)} is beyond ±2^53; left out")
            return None
        return int(number)

    def percent(self, key: str) -> int | None:
        """A 0-100 level (battery); outside it (firmware sends 255 for unknown) is not a
        fact about the robot, so it is left out and noted; the raw value stays in ``raw``."""
        value = self.integer(key)
        if value is not None and not 0 <= value <= 100:
            self.notes.append(f"{self.field(key)}: {value} is outside 0-100; left out")
            return None
        return value

    def text(self, key: str) -> str | None:
        value = self.raw(key)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # numeric ids (task_id: 123) are common in the wild
        name = self.field(key)
        raise InputError(f"{name} must be a string, got {_kind(value)}", field=name)

    def enum(self, key: str) -> str | None:
        value = self.text(key)
        return None if value is None else value.strip().lower()

    def flag(self, key: str) -> bool | None:
        value = self.raw(key)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        number = self.number(key)
        return number is not None and number > 0  # Pudu: 1 charging, -1 (or 0) not

    def obj(self, key: str) -> _Reader | None:
        value = self.raw(key)
        if value is None:
            return None
        name = self.field(key)
        if not isinstance(value, dict):
            raise InputError(f"{name} must be an object, got {_kind(value)}", field=name)
        return _Reader(value, name, self.notes)


def _digest(parts: Any) -> str:
    """Hex id of JSON-able parts; ASCII JSON so lone surrogates from the wire still hash."""
    try:
        blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InputError("data must be plain JSON", field="data") from exc
    return hashlib.sha256(blob.encode()).hexdigest()[:_ID_HEX]


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


def _charge(r: _Reader) -> str | None:
    stage = r.enum("charge_stage")
    return stage if stage is not None else r.enum("charge_state")  # third-party alias


def _status(r: _Reader, ctype: str, sn: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Each type documents one key; the other is accepted when it is the only one sent.
    keys = ("run_status", "run_state") if ctype == "robotStatus" else ("run_state", "run_status")
    for key in keys:
        if "status" not in out:
            _put(out, "status", r.enum(key))
    _put(out, "battery_level", r.percent("battery"))
    _put(out, "is_charging", r.flag("is_charging"))
    _put(out, "charge_state", _charge(r))
    _put(out, "move_state", r.enum("move_state"))
    _put(out, "charge_type", r.integer("charge_type"))
    _put(out, "remain_time", r.integer("remain_time"))
    return out


def _event(r: _Reader, ctype: str, sn: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    error_id = r.text("error_id")
    if error_id is not None:
        error_id = error_id.strip()
        out["event_id"] = error_id if len(error_id) <= _MAX_EVENT_ID else _digest([error_id])
    else:
        # error_id "may be missing or empty" (docs/pudu.md): derive one a retry reproduces.
        out["event_id"] = _digest([sn, r.raw("error_type"), r.raw("error_detail"),
                                   r.raw("timestamp"), r.raw("notify_timestamp")])
    level = r.enum("error_level")
    out["event_level"] = _LEVELS.get(level, _DEFAULT_LEVEL) if level else _DEFAULT_LEVEL
    _put(out, "event_type", r.text("error_type"))
    _put(out, "event_detail", r.text("error_detail"))
    _put(out, "language", r.text("language"))
    ext = r.obj("extend_info")
    if ext is not None:
        # Cleaning robots send no power/pose callbacks: this is their battery and position.
        _put(out, "battery_level", ext.percent("battery"))
        position = ext.obj("position")
        if position is not None:
            for axis in ("x", "y", "yaw"):
                _put(out, axis, position.number(axis))
        for key in ("map_name", "task_id", "task_type"):
            _put(out, key, ext.text(key))
    return out


def _power(r: _Reader, ctype: str, sn: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "battery_level", r.percent("power"))
    _put(out, "charge_state", _charge(r))  # an open set (docs/pudu.md): not validated
    return out


def _pose(r: _Reader, ctype: str, sn: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for axis in ("x", "y", "z", "yaw"):
        _put(out, axis, r.number(axis))
    return out


def _move(r: _Reader, ctype: str, sn: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "move_state", r.enum("state"))
    return out


def _task(r: _Reader, ctype: str, sn: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "task_id", r.text("task_id"))
    _put(out, "task_name", r.text("task_name"))
    _put(out, "task_status", r.enum("status"))
    task_time = r.number("task_time")
    _put(out, "task_time", None if task_time is None else to_seconds(task_time))
    _put(out, "remark", r.text("remark"))
    _put(out, "task_method", r.text("task_method"))
    return out


_BUILDERS: Final[dict[str, Callable[[_Reader, str, str], dict[str, Any]]]] = {
    "status": _status,
    "event": _event,
    "power": _power,
    "pose": _pose,
    "move": _move,
    "task": _task,
}


def _callback_type(body: dict[Any, Any]) -> str:
    value = body.get("callback_type")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError("callback_type is missing or empty", field="callback_type")
    if not isinstance(value, str):
        raise InputError(f"callback_type must be a string, got {_kind(value)}",
                         field="callback_type")
    value = value.strip()
    if not _TYPE_RE.fullmatch(value):
        raise InputError(
            f"callback_type {_show(value)} may hold only letters, digits, '_', '-', '.' "
            "(at most 64): it becomes an MQTT topic level",
            field="callback_type",
        )
    return _CANONICAL.get(value.lower(), value)


def _serial(r: _Reader, ext: _Reader | None) -> str | None:
    """The robot sn: a string or an int (seen in the wild), usable as a topic level."""
    value, name = r.raw("sn"), "data.sn"
    if value is None and ext is not None:
        value, name = ext.raw("sn"), "data.extend_info.sn"  # robotErrorNotice carries it too
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{name} must be a string, got {_kind(value)}", field=name)
    sn = str(value).strip()
    if any(c in sn for c in _BAD_SN_CHARS) or refused_character(sn) is not None:
        raise InputError(f"{name} must not contain '/', '+', '#', control characters or "
                         "noncharacters: it is a topic level", field=name)
    try:
        size = len(sn.encode())
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid UTF-8 text", field=name) from None
    if size > MAX_SN_BYTES:
        raise InputError(f"{name} is longer than {MAX_SN_BYTES} bytes", field=name)
    return sn


def _robot_time(r: _Reader, received_at: float, *, strict: bool,
                max_skew: float, clock_offset: float = 0.0) -> tuple[float, bool, float | None]:
    """``notify_timestamp`` (robot-side, what Pudu says to order by), then ``timestamp``;
    and whether it was refused for being too far ahead.

    A non-positive or still-too-large value (µs, garbage) falls through to the next
    source rather than refusing the callback, which would drop it after Pudu's retries.
    A wrongly typed one is refused on normalised channels; on ``callback/*`` channels we
    interpret nothing, so it only falls through. A time more than ``max_skew`` seconds
    ahead of ``received_at`` would freeze the robot downstream (every real state after
    it looks older), so ``received_at`` orders it instead, with a note. ``clock_offset``
    corrects the gateway clock when its robots agree it is wrong (bridge.clock), so a
    wrong gateway clock never makes correct robot times look too far ahead.
    """
    for key in ("notify_timestamp", "timestamp"):
        try:
            value = r.number(key)
        except InputError:
            if strict:
                raise
            continue
        if value is not None:
            seconds = to_seconds(value)
            if 0 < seconds < MS_THRESHOLD:
                ahead = seconds - (to_seconds(received_at) + clock_offset)
                if ahead > max_skew:
                    r.notes.append(
                        f"{r.field(key)}: {_show(value)} is {ahead:.0f} s ahead of the "
                        f"gateway clock (limit {max_skew:g} s); ordered by received_at")
                    return to_seconds(received_at), True, seconds
                return seconds, False, seconds
    return to_seconds(received_at), False, None


def normalize(body: Any, *, received_at: float,
              max_skew: float = DEFAULT_MAX_SKEW, clock_offset: float = 0.0) -> Normalized:
    """Normalise one parsed callback body; ``InputError`` names what is wrong.

    ``received_at`` (gateway clock, seconds) is the robot time of last resort, and the
    robot time's stand-in when that is more than ``max_skew`` seconds ahead of it.
    """
    if not isinstance(body, dict):
        raise MalformedBodyError(
            f"body must be a JSON object with callback_type and data, got {_kind(body)}",
        )
    body = _clean_keys(body)
    ctype = _callback_type(body)
    raw = body.get("data")
    if raw is None:
        raise InputError("data is required (a JSON object)", field="data")
    if not isinstance(raw, dict):
        raise InputError(f"data must be a JSON object, got {_kind(raw)}", field="data")
    r = _Reader(raw, "data")
    channel = CHANNELS.get(ctype)
    ext = r.obj("extend_info") if channel == "event" else None
    sn = _serial(r, ext)
    if channel is not None and sn is None:
        raise InputError(f"data.sn (the robot serial number) is required for {ctype}",
                         field="data.sn")
    ts, skewed, robot_ts = _robot_time(r, received_at, strict=channel is not None,
                                       max_skew=max_skew, clock_offset=clock_offset)
    skew_note = r.notes[-1] if skewed else None

    if channel is None:
        channel, fields = channel_for(ctype), {}  # callback/{type}: forwarded raw
    else:
        assert sn is not None
        fields = _BUILDERS[channel](r, ctype, sn)
        mac = r.text("mac")
        if mac is None and ext is not None:
            mac = ext.text("mac")
        _put(fields, "mac", mac)

    error_id = r.text("error_id") if channel == "event" else None
    if error_id is not None and error_id.strip():
        # Scoped by sn and hashed: error ids are not known to be unique across robots,
        # and the id must fit the 64-char message id columns downstream.
        message_id = "evt-" + _digest(["evt", sn, error_id.strip()])
    else:
        message_id = _digest([ctype, sn, raw])
    return Normalized(
        callback_type=ctype,
        channel=channel,
        device_id=sn,
        ts=ts,
        message_id=message_id,
        data=fields,
        raw=raw,
        compact_key=f"{channel}:{sn}" if channel in COMPACTABLE else None,
        notes=tuple(r.notes),
        skewed=skewed,
        skew_note=skew_note,
        robot_ts=robot_ts,
    )
