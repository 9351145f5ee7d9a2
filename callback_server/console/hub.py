"""The console's live feed: what changed, fetched once, fanned out to each browser.

Committed batches name the robots that changed and carry the new events (``observe``),
alert transitions name the alerts (``on_transition``) and gateway presence or heartbeats
the gateways (``on_gateway``). One loop (``run``) reads the changed robots' rows in one
query per tick, however many browsers watch, and hands each client the objects of its
orgs. A client holds at most one pending version of each object (and at most
``EVENTS_PENDING`` events), so a slow browser gets the newest state in its next frame
rather than a growing backlog, and each stream sends at most ``1 / frame_seconds``
frames a second.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable
from typing import Any

from bridge.envelope import Envelope
from callback_server.alerts import Transition
from callback_server.keys import Principal
from callback_server.store import Store

__all__ = ["KINDS", "ConsoleClient", "ConsoleHub"]

log = logging.getLogger(__name__)

#: The SSE event names, each carrying a JSON array of changed objects.
KINDS = ("robots", "events", "alerts", "gateways")
#: What identifies an object of each kind, and which of its fields names its org.
_KEYS = {"robots": ("robot_sn",), "events": ("robot_sn", "event_id"), "alerts": ("id",),
         "gateways": ("org_id", "gateway_id")}
_ORG = {"robots": "org_id", "events": "org_id", "alerts": "org", "gateways": "org_id"}
#: Events are news, not state: past this many pending, a slow client loses the oldest.
EVENTS_PENDING = 200


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def event_of(env: Envelope) -> dict[str, Any] | None:
    """An event envelope as the read API returns the event (``GET /robots/{sn}/events``)."""
    data = env.data
    if env.channel != "event" or data.get("event_id") in (None, ""):
        return None
    return {"robot_sn": env.device, "event_id": str(data["event_id"]),
            "event_level": data.get("event_level"), "event_type": data.get("event_type"),
            "event_detail": data.get("event_detail"), "task_time": _iso(env.ts),
            "upload_time": _iso(env.received_at), "callback_type": env.type,
            "org_id": env.org, "gateway_id": env.gateway, "ts": env.ts}


class ConsoleClient:
    """One open stream: its principal, and the newest pending version of each object."""

    def __init__(self, principal: Principal,
                 alive: Callable[[], bool] = lambda: True) -> None:
        self.principal = principal
        #: False once the client's session has ended (signed out, expired): stream ends.
        self.alive = alive
        self.pending: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in KINDS}
        self.wake = asyncio.Event()
        self.closed = False
        self.frames = 0

    def push(self, kind: str, items: Iterable[dict[str, Any]]) -> None:
        """Queue the objects of ``kind`` this client may see (newer replaces older)."""
        keys, mine, org = _KEYS[kind], self.pending[kind], _ORG[kind]
        for item in items:
            if self.principal.covers(item.get(org)):
                key = "/".join(str(item[k]) for k in keys)
                mine.pop(key, None)  # re-inserted last: the newest stays in the bound
                mine[key] = item
                self.wake.set()
        while kind == "events" and len(mine) > EVENTS_PENDING:
            del mine[next(iter(mine))]

    def take(self) -> dict[str, list[dict[str, Any]]]:
        """Everything pending, by kind, and nothing pending afterwards."""
        out = {k: list(v.values()) for k, v in self.pending.items() if v}
        for v in self.pending.values():
            v.clear()
        self.wake.clear()
        return out

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class ConsoleHub:
    """Changed robots and alerts -> every open console stream (see the module doc)."""

    def __init__(self, store: Store, *, tick_seconds: float = 0.2,
                 frame_seconds: float = 0.25, max_clients: int = 200) -> None:
        self.store = store
        self.tick_seconds = tick_seconds
        self.frame_seconds = frame_seconds
        self.max_clients = max_clients
        self.clients: set[ConsoleClient] = set()
        self._robots: set[tuple[str, str]] = set()  # (org, sn)
        self._events: list[dict[str, Any]] = []
        self._alerts: dict[str, dict[str, Any]] = {}
        self._gateways: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self.fetches = 0

    def observe(self, items: Iterable[tuple[str, Envelope]]) -> None:
        """Robot messages whose rows were just committed (the batch writer's hook)."""
        if not self.clients:
            return  # nobody watches: no query at all
        for _, env in items:
            self._robots.add((env.org, env.device))
            event = event_of(env)
            if event is not None:
                self._events.append(event)
        # one tick's worth, over every org: one org's burst must not crowd out another's
        del self._events[:-10 * EVENTS_PENDING]
        self._wake.set()

    def on_transition(self, transition: Transition) -> None:
        """An alert opened, acknowledged or resolved (alert delivery's listener)."""
        if self.clients:
            self._alerts[transition.alert.id] = transition.alert.as_dict()
            self._wake.set()

    def on_gateway(self, gateway: dict[str, Any]) -> None:
        """A gateway's presence or heartbeat changed (the server's gateway handler)."""
        if self.clients:
            self._gateways[f"{gateway['org_id']}/{gateway['gateway_id']}"] = dict(gateway)
            self._wake.set()

    def join(self, principal: Principal,
             alive: Callable[[], bool] = lambda: True) -> ConsoleClient | None:
        """A new client, or None when ``max_clients`` streams are open already."""
        if len(self.clients) >= self.max_clients:
            return None
        client = ConsoleClient(principal, alive)
        self.clients.add(client)
        return client

    def leave(self, client: ConsoleClient) -> None:
        client.close()
        self.clients.discard(client)

    def end_dead(self) -> None:
        """End the streams whose session is gone (called on sign-out)."""
        for client in list(self.clients):
            if not client.alive():
                client.close()

    def end_streams(self) -> None:
        """End every open stream now (stopping), so none holds the listener open."""
        for client in list(self.clients):
            client.close()

    async def run(self) -> None:
        """Fetch and fan out what changed, at most once a tick, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            robots, self._robots = self._robots, set()
            alerts, self._alerts = self._alerts, {}
            events, self._events = self._events, []
            gateways, self._gateways = self._gateways, {}
            try:
                rows = await self.store.get_robots_of(robots) if robots else []
                self.fetches += 1 if robots else 0
            except Exception:  # a database hiccup: the next change brings the row again
                log.warning("console: could not read %d changed robots", len(robots),
                            exc_info=True)
                rows = []
            for client in list(self.clients):
                if rows:
                    client.push("robots", rows)
                for kind, changed in (("events", events), ("alerts", alerts.values()),
                                      ("gateways", gateways.values())):
                    if changed:
                        client.push(kind, changed)
            await asyncio.sleep(self.tick_seconds)
