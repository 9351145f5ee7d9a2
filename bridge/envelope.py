"""The message envelope every robot message travels in (docs/design-contracts.md, "Envelope")."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from bridge import strictjson
from bridge.errors import PayloadError
from bridge.topic import MAX_SN_BYTES

SCHEMA_VERSION = 1
_REQUIRED = ("id", "type", "org", "device", "ts")


@dataclass(frozen=True, slots=True)
class Envelope:
    """One normalised robot (or gateway) message.

    ``ts`` is the robot-side time in seconds (``notify_timestamp`` when present), which
    consumers order by; ``received_at`` is the gateway's clock when it was accepted.
    ``id`` is stable for the same callback so redelivery is idempotent downstream.
    ``notes`` says what a gateway or server changed to keep it strict JSON or its time
    sane (the original values stay in ``raw``). ``source`` is ``"poll"`` for what the
    Pudu cloud poller read; empty (absent on the wire) means a webhook.
    """

    id: str
    type: str
    org: str
    device: str
    gateway: str
    ts: float
    received_at: float
    data: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    channel: str = ""
    v: int = SCHEMA_VERSION

    notes: tuple[str, ...] = ()
    source: str = ""
    #: History: sent after a newer message of its robot and channel (a drain that sent
    #: the newest state first). Kept in the message log, never merged into state.
    replay: bool = False

    def to_json(self) -> bytes:
        """RFC 8259 JSON; a NaN/Infinity or unsafe integer that got into ``data`` or
        ``raw`` is nulled on a copy and noted rather than sent as bare ``NaN``."""
        obj = self.as_dict()
        try:
            return strictjson.dumps(obj)
        except ValueError:  # allow_nan=False refused a non-finite float
            notes = list(self.notes)
            obj = strictjson.clean(copy.deepcopy(obj), "", notes)
            obj["notes"] = notes
            return strictjson.dumps(obj)

    def as_dict(self) -> dict[str, Any]:
        """The published shape (``notes`` and ``source`` only when set)."""
        # A flat dict, not dataclasses.asdict(): that deep-copies data/raw on the hot path.
        obj = {"v": self.v, "id": self.id, "type": self.type, "channel": self.channel,
               "org": self.org, "device": self.device, "gateway": self.gateway,
               "ts": self.ts, "received_at": self.received_at, "data": self.data,
               "raw": self.raw}
        if self.notes:
            obj["notes"] = list(self.notes)
        if self.source:
            obj["source"] = self.source
        if self.replay:
            obj["replay"] = True
        return obj

    def with_notes(self, *notes: str) -> Envelope:
        """A copy with ``notes`` added (what a receiver changed, e.g. an insane ts)."""
        return dataclasses.replace(self, notes=(*self.notes, *notes)) if notes else self

    @classmethod
    def from_json(cls, payload: bytes | str) -> Envelope:
        """Parse (bounded, strict) and validate; PayloadError names what is wrong."""
        try:
            parsed = strictjson.loads(payload)
        except PayloadError as exc:
            raise PayloadError(f"envelope is {exc}") from None
        return cls.from_dict(parsed.value, notes=parsed.notes)

    @classmethod
    def from_dict(cls, obj: Any, *, notes: list[str] | None = None) -> Envelope:
        """Validate a decoded envelope; every fault is a PayloadError naming the field.

        ``notes`` are what parsing changed (strictjson.loads); they join the envelope's own.
        """
        if not isinstance(obj, dict):
            raise PayloadError("envelope must be a JSON object")
        missing = [k for k in _REQUIRED if obj.get(k) in (None, "")]
        if missing:
            raise PayloadError(f"envelope lacks {', '.join(missing)}")
        version = obj.get("v", SCHEMA_VERSION)
        if type(version) is not int or version != SCHEMA_VERSION:
            raise PayloadError(f"envelope v must be {SCHEMA_VERSION}, got {_show(version)}")
        ts = _seconds(obj["ts"], "ts")
        received = obj.get("received_at")
        received_at = ts if received in (None, "") else _seconds(received, "received_at")
        data = {} if obj.get("data") is None else obj["data"]
        raw = {} if obj.get("raw") is None else obj["raw"]
        if not isinstance(data, dict) or not isinstance(raw, dict):
            raise PayloadError("envelope data/raw must be objects")
        replay = obj.get("replay", False)
        if replay is None:
            replay = False
        if not isinstance(replay, bool):
            raise PayloadError(f"envelope replay must be true or false, got {_show(replay)}")
        own = obj.get("notes") or []
        if not isinstance(own, list) or not all(isinstance(n, str) for n in own):
            raise PayloadError("envelope notes must be a list of strings")
        device = _name(obj, "device")
        if len(device.encode("utf-8", "surrogatepass")) > MAX_SN_BYTES:
            # refused, never shortened: a robot is stored and found under its own sn
            raise PayloadError(f"envelope device is longer than {MAX_SN_BYTES} bytes, "
                               "the longest sn the product accepts")
        return cls(
            id=_name(obj, "id"), type=_name(obj, "type"), org=_name(obj, "org"),
            device=device, gateway=_name(obj, "gateway"),
            ts=ts, received_at=received_at, data=data, raw=raw,
            channel=_name(obj, "channel"), v=version, source=_name(obj, "source")[:32],
            notes=tuple((*own, *(notes or ())))[:strictjson.MAX_NOTES + 1],
            replay=replay,
        )


#: How a history message (``"replay": true``) begins: ``mark_replay`` puts it first.
REPLAY_PREFIX = b'{"replay":true,'


def mark_replay(payload: bytes) -> bytes:
    """The published envelope ``payload`` marked as history (``"replay": true``).

    A splice, not a parse and re-dump: the drain marks thousands of stored payloads, and
    a JSON object's first member may come first. Already-marked payloads are unchanged.
    """
    if payload.startswith(REPLAY_PREFIX) or not payload.startswith(b"{"):
        return payload
    return REPLAY_PREFIX + payload[1:]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _name(obj: dict[str, Any], key: str) -> str:
    """A string field (an integer is taken as its digits, as ids often are)."""
    value = obj.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if type(value) is int:
        return str(value)
    raise PayloadError(f"envelope {key} must be a string, got {_show(value)}")


def _seconds(value: Any, key: str) -> float:
    """A finite epoch-seconds number (numeric strings accepted); PayloadError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PayloadError(f"envelope {key} must be a number, got {_show(value)}")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        raise PayloadError(f"envelope {key} must be a number, got {_show(value)}") from None
    if not math.isfinite(seconds):
        raise PayloadError(f"envelope {key} must be a finite number, got {_show(value)}")
    return seconds
