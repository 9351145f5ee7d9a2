"""The message envelope every robot message travels in (DESIGN.md, "Envelope")."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import PayloadError

SCHEMA_VERSION = 1
_REQUIRED = ("id", "type", "org", "device", "ts")


@dataclass(frozen=True, slots=True)
class Envelope:
    """One normalised robot (or gateway) message.

    ``ts`` is the robot-side time in seconds (``notify_timestamp`` when present), which
    consumers order by; ``received_at`` is the gateway's clock when it was accepted.
    ``id`` is stable for the same callback so redelivery is idempotent downstream.
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

    def to_json(self) -> bytes:
        # A flat dict, not dataclasses.asdict(): that deep-copies data/raw on the hot path.
        obj = {"v": self.v, "id": self.id, "type": self.type, "channel": self.channel,
               "org": self.org, "device": self.device, "gateway": self.gateway,
               "ts": self.ts, "received_at": self.received_at, "data": self.data,
               "raw": self.raw}
        try:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:
            # A lone surrogate ("\ud800") is valid JSON but not UTF-8: escape everything.
            return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> Envelope:
        """Parse and validate; PayloadError names what is wrong."""
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError(f"envelope is not JSON: {exc}") from exc
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any) -> Envelope:
        if not isinstance(obj, dict):
            raise PayloadError("envelope must be a JSON object")
        missing = [k for k in _REQUIRED if obj.get(k) in (None, "")]
        if missing:
            raise PayloadError(f"envelope lacks {', '.join(missing)}")
        try:
            ts = float(obj["ts"])
            received_at = float(obj.get("received_at") or ts)
        except (TypeError, ValueError) as exc:
            raise PayloadError("envelope ts/received_at must be numbers") from exc
        data = obj.get("data") or {}
        raw = obj.get("raw") or {}
        if not isinstance(data, dict) or not isinstance(raw, dict):
            raise PayloadError("envelope data/raw must be objects")
        return cls(
            id=str(obj["id"]),
            type=str(obj["type"]),
            org=str(obj["org"]),
            device=str(obj["device"]),
            gateway=str(obj.get("gateway") or ""),
            ts=ts,
            received_at=received_at,
            data=data,
            raw=raw,
            channel=str(obj.get("channel") or ""),
            v=int(obj.get("v") or SCHEMA_VERSION),
        )
