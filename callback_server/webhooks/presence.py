"""``gateway.online`` / ``gateway.offline``: presence judged against what subscribers were
last told, as the database remembers it.

Every replica receives every presence (a non-shared subscription of its own), and a
server that starts receives each gateway's retained presence again. Judged in each
process's memory, every replica told each change and every deploy told every gateway
"online" afresh. Here the ``webhook_presence`` row is the judge: the replica whose
compare-and-set changes it raises the event, so a change is told once whatever the
number of replicas or restarts, and a presence that only repeats the stored one (the
retained message a restart brings) is told to nobody.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from bridge.backoff import backoff_delay
from bridge.errors import StoreError
from callback_server.webhooks.events import Event
from callback_server.webhooks.store import WebhookStore

log = logging.getLogger(__name__)

#: Presences held while the database is away; past this the oldest are dropped (counted).
MAX_QUEUED = 10_000


class GatewayPresence:
    """``put`` from the consumer's gateway handler; ``run`` judges them in order."""

    def __init__(self, store: WebhookStore, emit: Callable[[Event], None], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.emit = emit
        self.clock = clock
        #: Presences judged (told or found unchanged), and dropped while the queue was full.
        self.judged = 0
        self.dropped = 0
        self._queue: collections.deque[tuple[str, str, str, float]] = collections.deque()
        self._wake = asyncio.Event()

    @property
    def pending(self) -> int:
        """Presences received and not yet judged."""
        return len(self._queue)

    def put(self, org: str, gateway: str, state: str) -> None:
        """A presence (``online`` / ``offline``) just received; never blocks the caller."""
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((org, gateway, state, self.clock()))
        self._wake.set()

    async def run(self) -> None:
        """Judge presences in the order received; a database away holds them (in order)
        until it answers."""
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                try:
                    await self.judge(*self._queue[0])
                except StoreError as exc:
                    failures += 1
                    delay = backoff_delay(failures, 0.2, 10.0)
                    log.warning("gateway presence not judged (%s); retrying in %.1f s",
                                exc, delay)
                    await asyncio.sleep(delay)
                    continue
                except Exception:  # a bug must not stop every later presence
                    log.exception("gateway presence %s not judged", self._queue[0][:3])
                failures = 0
                self._queue.popleft()

    async def judge(self, org: str, gateway: str, state: str, at: float) -> Event | None:
        """Emit ``gateway.{state}`` if ``state`` differs from the gateway's stored presence
        (or none is stored) and this replica's write changed it; the event, or None."""
        changed, before = await self.store.presence(org, gateway, state, at)
        self.judged += 1
        if not changed:
            return None
        event = Event(f"gateway.{state}", org,
                      {"gateway_id": gateway, "state": state, "previous": before}, at=at)
        self.emit(event)
        return event
