"""The console's live feed: what changed, fetched once, fanned out to each browser.

Committed batches name the robots that changed (``observe``) and alert transitions name
the alerts (``on_transition``). One loop (``run``) reads the changed robots' rows in one
query per tick, however many browsers watch, and hands each client the rows of its orgs.
A client holds at most one pending version of each object, so a slow browser gets the
newest state in its next frame rather than a growing backlog, and each stream sends at
most ``1 / frame_seconds`` frames a second.
"""

from __future__ import annotations

import asyncio
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
KINDS = ("robots", "alerts")
_KEYS = {"robots": "robot_sn", "alerts": "id"}


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
        key, mine = _KEYS[kind], self.pending[kind]
        org = "org_id" if kind == "robots" else "org"
        for item in items:
            if self.principal.covers(item.get(org)):
                mine[str(item[key])] = item
                self.wake.set()

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
        self._robots: set[str] = set()
        self._alerts: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self.fetches = 0

    def observe(self, items: Iterable[tuple[str, Envelope]]) -> None:
        """Robot messages whose rows were just committed (the batch writer's hook)."""
        if not self.clients:
            return  # nobody watches: no query at all
        self._robots.update(env.device for _, env in items)
        self._wake.set()

    def on_transition(self, transition: Transition) -> None:
        """An alert opened, acknowledged or resolved (alert delivery's listener)."""
        if self.clients:
            self._alerts[transition.alert.id] = transition.alert.as_dict()
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
            sns, self._robots = self._robots, set()
            alerts, self._alerts = self._alerts, {}
            try:
                rows = await self.store.get_robots_by_sn(sns) if sns else []
                self.fetches += 1 if sns else 0
            except Exception:  # a database hiccup: the next change brings the row again
                log.warning("console: could not read %d changed robots", len(sns),
                            exc_info=True)
                rows = []
            for client in list(self.clients):
                if rows:
                    client.push("robots", rows)
                if alerts:
                    client.push("alerts", alerts.values())
            await asyncio.sleep(self.tick_seconds)
