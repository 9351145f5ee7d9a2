"""Pudu callback -> channel, device, robot time and normalised fields (pure, no I/O).

Liberal where meaning is clear (PUDU.md: vendor examples are not always valid wire
bodies): case-insensitive types and values, numeric strings, ``charge_state`` as an
alias of ``charge_stage``, keys with a stray trailing colon, millisecond timestamps.
Precise where it is not: every refusal is an InputError naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.errors import InputError

#: Every callback type Pudu documents, in its documented casing.
DOCUMENTED_TYPES = (
    "robotStatus", "notifyRobotStatus", "robotErrorWarning", "robotErrorNotice",
    "notifyRobotPower", "notifyRobotPose", "notifyRobotMoveState", "notifyCleanStatus",
    "TASK_STATUS", "robotBinding", "robotUnBinding", "robotActivate", "robotEmergencyRecover",
    "mapElementChange", "notifySwitchMap", "notifyCustomCall", "notifyRobotOrderState",
    "robotDeliveryStatus", "notifyTransportTask", "notifyDeliveryTask", "notifyErrandStatus",
    "notifyLiftingTask", "notifyLiftingStatus", "notifyCruiseTask", "notifyDoorsState",
    "notifyElevatorUtilizeState", "notifyQrCodeContent", "notifyRechargeStatus",
    "notifySwipeCard",
)
_CANONICAL = {t.lower(): t for t in DOCUMENTED_TYPES}

CHANNELS = {
    "robotStatus": "status",
    "notifyRobotStatus": "status",
    "robotErrorWarning": "event",
    "robotErrorNotice": "event",
    "notifyRobotPower": "power",
    "notifyRobotPose": "pose",
    "notifyRobotMoveState": "move",
    "notifyCleanStatus": "task",
    "TASK_STATUS": "task",
}
#: Superseded state of these channels may be compacted in a full outbox.
COMPACTABLE = ("pose", "power")

# PUDU.md severity map; seed-style upper-case names map to themselves.
_LEVELS = {
    "fatal": "critical", "error": "high", "warning": "warning", "event": "info",
    "critical": "critical", "high": "high", "medium": "medium", "info": "info",
    "warn": "warning",
}
_TYPE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_BAD_TOPIC_CHARS = ("/", "+", "#", "\x00")
_MS_THRESHOLD = 1e11  # seconds reach 1e11 in the year 5138; anything above is ms


@dataclass(frozen=True, slots=True)
class Normalized:
    """One callback, ready to be wrapped in an envelope."""

    callback_type: str
    channel: str
    device_id: str | None
    ts: float
    message_id: str
    data: dict[str, Any]
    raw: dict[str, Any]
    compact_key: str | None


def to_seconds(value: float) -> float:
    """Seconds from a Pudu timestamp in seconds or milliseconds."""
    return value / 1000.0 if value > _MS_THRESHOLD else float(value)


def _clean_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``{"sn:": ...}`` -> ``{"sn": ...}`` (a stray colon seen in vendor examples)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = key.rstrip(":").strip() if isinstance(key, str) else key
        out.setdefault(k, value)
    return out


def _number(data: dict[str, Any], key: str, path: str) -> float | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InputError(f"{path}.{key} must be a number, got a boolean", field=f"{path}.{key}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise InputError(f"{path}.{key} must be a number, got {value!r}",
                             field=f"{path}.{key}") from None
    else:
        raise InputError(f"{path}.{key} must be a number", field=f"{path}.{key}")
    if not math.isfinite(number):
        raise InputError(f"{path}.{key} must be finite", field=f"{path}.{key}")
    return number


def _int(data: dict[str, Any], key: str, path: str) -> int | None:
    number = _number(data, key, path)
    return None if number is None else int(number)


def _text(data: dict[str, Any], key: str, path: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise InputError(f"{path}.{key} must be a string", field=f"{path}.{key}")
    return str(value)


def _lower(data: dict[str, Any], key: str, path: str) -> str | None:
    value = _text(data, key, path)
    return value.strip().lower() if value is not None else None


def _bool(data: dict[str, Any], key: str, path: str) -> bool | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    number = _number(data, key, path)
    return bool(number and number > 0)  # Pudu: 1 charging, -1 (or 0) not


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


def _status(d: dict[str, Any], ctype: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "status", _lower(d, "run_status" if ctype == "robotStatus" else "run_state",
                               "data"))
    if ctype == "robotStatus" and "status" not in out:
        _put(out, "status", _lower(d, "status", "data"))
    _put(out, "battery_level", _int(d, "battery", "data"))
    _put(out, "is_charging", _bool(d, "is_charging", "data"))
    _put(out, "charge_state", _charge(d))
    _put(out, "move_state", _lower(d, "move_state", "data"))
    _put(out, "charge_type", _int(d, "charge_type", "data"))
    _put(out, "remain_time", _int(d, "remain_time", "data"))
    return out


def _charge(d: dict[str, Any]) -> str | None:
    stage = _lower(d, "charge_stage", "data")
    return stage if stage is not None else _lower(d, "charge_state", "data")


def _event(d: dict[str, Any], sn: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    error_id = _text(d, "error_id", "data")
    if not error_id or not error_id.strip():
        basis = json.dumps([sn, d.get("error_type"), d.get("error_detail"), d.get("timestamp")],
                           sort_keys=True, default=str)
        error_id = "derived-" + hashlib.sha256(basis.encode()).hexdigest()[:24]
    out["event_id"] = error_id.strip()
    level = _lower(d, "error_level", "data") or ""
    out["event_level"] = _LEVELS.get(level, "medium")
    _put(out, "event_type", _text(d, "error_type", "data"))
    _put(out, "event_detail", _text(d, "error_detail", "data"))
    language = _text(d, "language", "data")
    if language:
        out["language"] = language
    extend = d.get("extend_info")
    if extend is not None and not isinstance(extend, dict):
        raise InputError("data.extend_info must be an object", field="data.extend_info")
    if extend:
        ext = _clean_keys(extend)
        _put(out, "battery_level", _int(ext, "battery", "data.extend_info"))
        position = ext.get("position")
        if position is not None and not isinstance(position, dict):
            raise InputError("data.extend_info.position must be an object",
                             field="data.extend_info.position")
        if position:
            for axis in ("x", "y", "yaw"):
                _put(out, axis, _number(position, axis, "data.extend_info.position"))
        for key in ("map_name", "task_id", "task_type"):
            value = _text(ext, key, "data.extend_info")
            if value:
                out[key] = value
    return out


def _power(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "battery_level", _int(d, "power", "data"))
    _put(out, "charge_state", _charge(d))
    return out


def _pose(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for axis in ("x", "y", "z", "yaw"):
        _put(out, axis, _number(d, axis, "data"))
    return out


def _move(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "move_state", _lower(d, "state", "data"))
    return out


def _task(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("task_id", "task_name", "remark", "task_method"):
        _put(out, key, _text(d, key, "data"))
    _put(out, "task_status", _lower(d, "status", "data"))
    task_time = _number(d, "task_time", "data")
    _put(out, "task_time", None if task_time is None else to_seconds(task_time))
    return out


_BUILDERS: dict[str, Callable[[dict[str, Any], str, str], dict[str, Any]]] = {
    "status": lambda d, t, sn: _status(d, t),
    "event": lambda d, t, sn: _event(d, sn),
    "power": lambda d, t, sn: _power(d),
    "pose": lambda d, t, sn: _pose(d),
    "move": lambda d, t, sn: _move(d),
    "task": lambda d, t, sn: _task(d),
}


def _callback_type(body: dict[str, Any]) -> str:
    value = body.get("callback_type")
    if not isinstance(value, str) or not value.strip():
        raise InputError("callback_type must be a non-empty string", field="callback_type")
    value = value.strip()
    if not _TYPE_RE.match(value):
        raise InputError("callback_type may hold only letters, digits, '_', '-', '.' (max 64)",
                         field="callback_type")
    return _CANONICAL.get(value.lower(), value)


def _serial(data: dict[str, Any], required: bool) -> str | None:
    value = data.get("sn")
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError("data.sn (the robot serial number) is required", field="data.sn")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError("data.sn must be a string", field="data.sn")
    sn = str(value).strip()
    if any(c in sn for c in _BAD_TOPIC_CHARS) or len(sn) > 128:
        raise InputError("data.sn must not contain '/', '+', '#' and be at most 128 chars",
                         field="data.sn")
    return sn


def normalize(body: Any, *, received_at: float) -> Normalized:
    """Normalise one parsed callback body; InputError names what is wrong."""
    if not isinstance(body, dict):
        raise InputError("body must be a JSON object with callback_type and data", status=400)
    body = _clean_keys(body)
    ctype = _callback_type(body)
    raw = body.get("data")
    if not isinstance(raw, dict):
        raise InputError("data must be a JSON object", field="data")
    data = _clean_keys(raw)
    channel = CHANNELS.get(ctype)
    sn = _serial(data, required=channel is not None)
    ts = _robot_time(data, received_at)
    if channel is None:
        channel, fields = f"callback/{ctype}", {}
    else:
        fields = _BUILDERS[channel](data, ctype, sn or "")
    mac = _text(data, "mac", "data")
    if mac and channel in CHANNELS.values():
        fields["mac"] = mac
    if channel == "event":
        key = f"{sn}\x00{fields['event_id']}"
        message_id = "evt-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    else:
        canonical = json.dumps([ctype, sn, raw], sort_keys=True, default=str, ensure_ascii=False)
        message_id = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    return Normalized(
        callback_type=ctype,
        channel=channel,
        device_id=sn,
        ts=ts,
        message_id=message_id,
        data=fields,
        raw=raw,
        compact_key=f"{channel}:{sn}" if channel in COMPACTABLE and sn else None,
    )


def _robot_time(data: dict[str, Any], received_at: float) -> float:
    """``notify_timestamp`` (robot-side, what Pudu says to order by), else ``timestamp``."""
    for key in ("notify_timestamp", "timestamp"):
        value = _number(data, key, "data")
        if value is not None and value > 0:
            return to_seconds(value)
    return received_at
