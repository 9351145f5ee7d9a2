"""Retention: the raw message log, dead letters, command records and the webhook
delivery logs are pruned by age.

The log grows by one row per message (the highest-volume table) and nothing else reads
old rows of it: events and latest state live in their own tables, which are never
pruned. Dead letters and commands are kept longer, for whoever investigates. A webhook's
delivery log grows by one row per attempt (a dead receiver: one per attempt of every
event), and its old rows only say how a delivery went long ago.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from bridge.errors import StoreError
from callback_server.store import Store

log = logging.getLogger(__name__)

#: ``prune(older_than, batch)``: delete up to ``batch`` rows older than that; how many.
Pruner = Callable[[float, int], Awaitable[int]]


class Retention:
    """Deletes rows older than each table's retention, in small batches, every interval."""

    def __init__(self, store: Store, days: Mapping[str, float], *, interval: float,
                 batch: int = 5000, pruners: Mapping[str, Pruner] | None = None) -> None:
        """``days`` by table: the store's prunable tables, and tables declared elsewhere
        (the webhook tables) with their own ``pruners``."""
        self.store = store
        self.days = {table: d for table, d in days.items() if d > 0}  # 0: keep forever
        self.pruners = dict(pruners or {})
        self.interval = interval
        self.batch = batch
        self.pruned: dict[str, int] = dict.fromkeys(self.days, 0)

    async def run(self) -> None:
        """Run until cancelled; a database outage only postpones a pass."""
        while self.days:
            try:
                await self.prune_once()
            except StoreError as exc:
                log.warning("retention pass failed (%s); next try in %.0f s", exc, self.interval)
            await asyncio.sleep(self.interval)

    async def prune_once(self, now: float | None = None) -> int:
        """One pass over every table; returns how many rows it deleted."""
        now = time.time() if now is None else now
        total = 0
        for table, days in self.days.items():
            cutoff = now - days * 86400
            while True:
                pruner = self.pruners.get(table)
                deleted = await (self.store.prune(table, cutoff, self.batch)
                                 if pruner is None else pruner(cutoff, self.batch))
                self.pruned[table] += deleted
                total += deleted
                if deleted < self.batch:
                    break
                await asyncio.sleep(0)  # let the ingest path in between batches
        if total:
            log.info("retention deleted %d rows (%s)", total, self.pruned)
        return total
