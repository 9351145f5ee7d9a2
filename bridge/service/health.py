"""Health answers both services share: readiness, and the ``?ready=1`` / ``?strict=1`` forms.

Three questions, three answers, so each caller gets the one it needs:

- plain ``GET .../health``: always 200 while the process serves, with ``status``
  ``healthy|degraded`` and the detail (what operators and dashboards read);
- ``?ready=1``: 503 until the service can take traffic (listeners bound, outbox or
  database open) and while it stops; a load balancer's or orchestrator's target check.
  The broker is never part of it: an edge agent takes webhooks into its outbox while the
  uplink is down, and a callback server takes HTTP ingest;
- ``?strict=1``: 503 while ``degraded`` (or not ready), for ``curl -f`` monitors that
  only see the status code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from bridge.errors import InputError

__all__ = ["HEALTH_RESPONSES", "HealthQuery", "Readiness", "health_status", "unready_body"]

#: The OpenAPI ``responses`` of every health route (its three forms answer the same).
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"description": "Not ready (`?ready=1`), or degraded (`?strict=1`)"}}

_TRUE = frozenset({"", "1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class Readiness:
    """What still keeps a service from taking traffic: named parts, each up or not.

    ``expect`` names a part that must come up (the service's own state on entering, the
    listeners when a lifecycle serves them); ``stopping`` makes it unready for good, so a
    load balancer stops sending before the listeners close.
    """

    def __init__(self, *parts: str) -> None:
        self._waiting: dict[str, None] = dict.fromkeys(parts)
        self._stopping = False

    def expect(self, part: str) -> None:
        self._waiting[part] = None

    def up(self, part: str) -> None:
        self._waiting.pop(part, None)

    def down(self, part: str) -> None:
        self._waiting[part] = None

    def waiting_for(self, part: str) -> bool:
        return part in self._waiting

    def stopping(self) -> None:
        self._stopping = True

    def reasons(self) -> list[str]:
        """Why the service is not ready (empty when it is)."""
        if self._stopping:
            return ["stopping"]
        return [f"{part} not ready" for part in self._waiting]

    @property
    def ready(self) -> bool:
        return not self.reasons()


def _flag(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name)
    if value is None:
        return False
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InputError(f"{name} must be 1 or 0 (true/false), got {value[:20]!r}", field=name)


class HealthQuery:
    """The query of a health request: ``ready`` and ``strict`` flags (422 on a bad value)."""

    def __init__(self, query: Mapping[str, str]) -> None:
        self.ready = _flag(query, "ready")
        self.strict = _flag(query, "strict")


def health_status(body: Mapping[str, Any], query: HealthQuery, not_ready: list[str]) -> int:
    """The HTTP status of a health answer: 503 when the form asked for fails, else 200."""
    if (query.ready or query.strict) and not_ready:
        return 503
    if query.strict and body.get("status") != "healthy":
        return 503
    return 200


def unready_body(service: str, reasons: list[str]) -> dict[str, Any]:
    """The body while a service cannot report more than why it is not ready (starting)."""
    return {"status": "unavailable", "ready": False, "not_ready": reasons,
            "timestamp": int(time.time()), "service": service}
