"""An alert, a transition of one, and the subject key that makes an alert unique."""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from callback_server.times import iso

State = Literal["open", "acknowledged", "resolved"]
STATES: tuple[State, ...] = ("open", "acknowledged", "resolved")
TransitionName = Literal["opened", "severity_changed", "acknowledged", "resolved"]


@functools.lru_cache(maxsize=16384)  # every robot's subjects, digested on every batch
def subject_key(rule: str, org: str, subject_type: str, subject_id: str) -> str:
    """The digest that is unique among open alerts (and keys a silence)."""
    raw = json.dumps([rule, org, subject_type, subject_id], separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Subject:
    """What an alert is about: a robot (its sn) or a gateway, within an org."""

    rule: str
    org: str
    subject_type: str
    subject_id: str

    @property
    def key(self) -> str:
        return subject_key(self.rule, self.org, self.subject_type, self.subject_id)


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert as stored; ``as_dict`` is its API and delivery shape."""

    id: str
    rule: str
    org: str
    subject_type: str
    subject_id: str
    severity: str
    state: str
    opened_at: float
    updated_at: float
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None
    comment: str | None = None
    resolved_at: float | None = None
    condition_at: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    silenced_until: float | None = None

    @property
    def subject(self) -> Subject:
        return Subject(self.rule, self.org, self.subject_type, self.subject_id)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Alert:
        try:
            detail = json.loads(row.get("detail") or "{}")
        except ValueError:
            detail = {"text": row.get("detail")}

        def num(name: str) -> float | None:
            value = row.get(name)
            return None if value is None else float(value)

        return cls(
            id=str(row["id"]), rule=str(row["rule"]), org=str(row["org_id"]),
            subject_type=str(row["subject_type"]), subject_id=str(row["subject_id"]),
            severity=str(row["severity"]), state=str(row["state"]),
            opened_at=float(row["opened_at"]), updated_at=float(row["updated_at"]),
            acknowledged_by=row.get("acknowledged_by"), acknowledged_at=num("acknowledged_at"),
            comment=row.get("comment"), resolved_at=num("resolved_at"),
            condition_at=num("condition_at"),
            detail=detail if isinstance(detail, dict) else {"value": detail},
            silenced_until=num("silenced_until"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "rule": self.rule, "org": self.org,
            "subject_type": self.subject_type, "subject_id": self.subject_id,
            "severity": self.severity, "state": self.state,
            "opened_at": iso(self.opened_at), "updated_at": iso(self.updated_at),
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": iso(self.acknowledged_at), "comment": self.comment,
            "resolved_at": iso(self.resolved_at), "silenced_until": iso(self.silenced_until),
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of an alert that subscribers hear of; made only by the replica whose
    database write changed the row, so each happens once whatever the replica count."""

    name: TransitionName
    alert: Alert
    id: str = field(default_factory=new_id)
    silenced: bool = False  # a silenced subject: recorded, not delivered

    def body(self) -> dict[str, Any]:
        return {**self.alert.as_dict(), "transition": self.name, "transition_id": self.id}
