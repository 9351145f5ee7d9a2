"""The event names and how the server's own inputs become events.

Inputs are what the server already learns: rows the batch writer committed (robot events,
robot status, poll runs) and gateway presence; alert transitions are submitted as events
by the alert delivery. Nothing here reads the database: an event is news of something
just stored or just seen. Gateway presence is the exception: whether it changed is judged
against the database (``presence.py``), handed over by ``on_gateway``.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bridge.envelope import Envelope
from bridge.topic import DeviceAddress
from callback_server.store.rows import channel_of, is_robot_state

EVENTS = ("robot.status_changed", "robot.error", "robot.offline", "robot.online",
          "gateway.offline", "gateway.online", "alert.opened", "alert.resolved",
          "run.failed", "run.partial")

#: Robots whose last status is remembered (status_changed needs the one before).
MAX_ROBOTS = 100_000
#: Message ids remembered so a redelivered message (stored as a duplicate, yet told to
#: the committed-batch hook again) raises no second event.
MAX_SEEN = 50_000


@dataclass(frozen=True, slots=True)
class Event:
    """One event for subscribers of ``name`` in ``org``."""

    name: str
    org: str
    data: dict[str, Any]
    at: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: "evt_" + secrets.token_hex(8))
    #: What it is about, kept with each delivery attempt (an alert's id); None: nothing.
    ref: str | None = None

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.name, "org_id": self.org,
                "timestamp": int(self.at), "data": self.data}


class EventSource:
    """Turns committed batches, presence and transitions into events for ``emit``."""

    def __init__(self, emit: Callable[[Event], None],
                 presence: Callable[[str, str, str], None]) -> None:
        self.emit = emit
        #: Takes (org, gateway, state) to judge against the stored presence.
        self.presence = presence
        self._status: dict[tuple[str, str], str] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()

    def _first(self, env: Envelope) -> bool:
        """True the first time this process sees this message id."""
        if env.id in self._seen:
            return False
        self._seen[env.id] = None
        if len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        return True

    def observe(self, items: Iterable[tuple[str, Envelope]]) -> None:
        """The batch writer's committed-batch hook (chained after the alert engine's)."""
        for topic, env in items:
            if not self._first(env):
                continue
            channel = channel_of(topic, env)
            if channel == "poll" and env.type == "poll.run":
                self._run(env)
            elif is_robot_state(channel, env) and not env.replay:
                if channel == "event" and env.data.get("event_id") not in (None, ""):
                    self._error(env)
                status = env.data.get("status")
                if isinstance(status, str) and status:
                    self._robot_status(env, status.lower())

    def _robot(self, env: Envelope) -> dict[str, Any]:
        return {"robot_sn": env.device, "gateway_id": env.gateway or None, "ts": env.ts}

    def _error(self, env: Envelope) -> None:
        d = env.data
        self.emit(Event("robot.error", env.org, {
            **self._robot(env), "event_id": d.get("event_id"), "level": d.get("event_level"),
            "event_type": d.get("event_type"), "detail": d.get("event_detail")}))

    def _robot_status(self, env: Envelope, status: str) -> None:
        key = (env.org, env.device)
        before = self._status.get(key)
        if before == status:
            return
        if len(self._status) >= MAX_ROBOTS and key not in self._status:
            self._status.pop(next(iter(self._status)))
        self._status[key] = status
        data = {**self._robot(env), "status": status, "previous": before}
        self.emit(Event("robot.status_changed", env.org, data))
        if status in ("online", "offline"):
            self.emit(Event(f"robot.{status}", env.org, data))

    def _run(self, env: Envelope) -> None:
        """A poll run that did not end ``ok``: ``run.failed`` (every shop failed) or
        ``run.partial`` (some shop, robot or fault-log row failed), as the alert
        ``poll_failed`` opens on either."""
        rec = env.data
        status = rec.get("status")
        if status not in ("failed", "partial"):
            return
        self.emit(Event(f"run.{status}", env.org, {
            "gateway_id": env.gateway or env.device,
            **{k: rec.get(k) for k in ("run_id", "status", "error", "started_at", "ended_at",
                                       "shops_failed")}}))

    def on_gateway(self, address: DeviceAddress, payload: bytes) -> None:
        """A consumer gateway handler: presence ``online``/``offline`` to ``presence``,
        which tells it on change."""
        if address.channel != "presence":
            return
        state = payload.decode(errors="replace").strip().lower()[:32]
        if state in ("online", "offline"):
            self.presence(address.org_id, address.device_id, state)
