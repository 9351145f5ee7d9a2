"""Batches messages into store transactions and acknowledges only after the commit.

MQTT deliveries and HTTP pushes both land here. One writer task takes whatever has
queued since its last transaction (up to ``batch_max``) and writes it as one batch, so
load makes batches bigger instead of making the database busier. While the database
is down the batch is retried with backoff and nothing is acknowledged: the broker
(or the IoT Rule's HTTP retry) holds the messages for us.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from bridge.backoff import backoff_delay
from bridge.envelope import Envelope
from bridge.errors import StoreError, StoreRejectedError
from bridge.sdnotify import BEAT_SECONDS
from bridge.tasks import within
from callback_server.store import BatchStore

log = logging.getLogger(__name__)

OnCommit = Callable[[], None]
#: Told of each committed batch (the alert engine): ``(topic, envelope)`` pairs.
OnBatch = Callable[[list[tuple[str, Envelope]]], None]
T = TypeVar("T")


@dataclass(slots=True)
class _Item:
    topic: str
    envelope: Envelope
    on_commit: OnCommit


@dataclass(slots=True)
class _Dead:
    topic: str
    payload: bytes
    reason: str
    on_commit: OnCommit


class BatchWriter:
    """One writer task in front of the store."""

    def __init__(
        self, store: BatchStore, *, batch_max: int = 500, retry_min: float = 0.2,
        retry_max: float = 10.0, beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.batch_max = batch_max
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.beat = beat  # the watchdog's heartbeat: stamped every iteration, idle or not
        self.on_batch: OnBatch | None = None
        self.degraded = False
        self.last_error = ""
        self.stored = 0
        self.batches = 0
        self.dead_lettered = 0
        self.skewed = 0
        #: monotonic time of the last commit, or of the first wait since: a stall shows here
        self.last_progress = time.monotonic()
        self._items: collections.deque[_Item] = collections.deque()
        self._dead: collections.deque[_Dead] = collections.deque()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # set after each commit (drain waits on it)

    @property
    def pending(self) -> int:
        return len(self._items) + len(self._dead)

    def submit(self, topic: str, envelope: Envelope, on_commit: OnCommit) -> None:
        """Queue a message; ``on_commit`` runs once its rows are committed."""
        self._waiting()
        self._items.append(_Item(topic, envelope, on_commit))
        self._wake.set()

    def submit_dead(self, topic: str, payload: bytes, reason: str, on_commit: OnCommit) -> None:
        """Queue a malformed message for the dead-letter table."""
        self._waiting()
        self._dead.append(_Dead(topic, payload, reason, on_commit))
        self._wake.set()

    async def drain(self, grace: float) -> bool:
        """Stopping: wait (bounded) until everything queued is committed and acked."""
        deadline = time.monotonic() + grace
        while self.pending and time.monotonic() < deadline:
            await within(self._progress.wait(), deadline - time.monotonic())
            self._progress.clear()
        return not self.pending

    def _waiting(self) -> None:
        if not self.pending:  # idle until now: the stall clock starts with this message
            self.last_progress = time.monotonic()

    def stalled_seconds(self) -> float:
        """How long messages have waited with nothing committed (0 when none wait)."""
        return time.monotonic() - self.last_progress if self.pending else 0.0

    async def write(self, items: Sequence[tuple[str, Envelope]]) -> None:
        """Queue several messages and wait for their commit (the HTTP ingest path)."""
        if not items:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        remaining = len(items)

        def one_committed() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not done.done():
                done.set_result(None)

        for topic, envelope in items:
            self.submit(topic, envelope, one_committed)
        await done

    async def run(self) -> None:
        """Write batches until cancelled."""
        while True:
            self.beat()
            if not await within(self._wake.wait(), BEAT_SECONDS):
                continue
            self._wake.clear()
            while self._dead:
                n = min(len(self._dead), self.batch_max)
                letters = [self._dead[i] for i in range(n)]
                await self._dead_letters(letters)
                for _ in range(n):
                    self._dead.popleft()
                self.last_progress = time.monotonic()
                self._progress.set()
                for dead in letters:
                    dead.on_commit()
            while self._items:
                n = min(len(self._items), self.batch_max)
                batch = [self._items[i] for i in range(n)]
                await self._write(batch)
                for _ in range(n):
                    self._items.popleft()
                self.stored += n
                self.batches += 1
                self.last_progress = time.monotonic()
                self._progress.set()
                for item in batch:
                    item.on_commit()
                self._tell(batch)

    def _tell(self, batch: list[_Item]) -> None:
        """Hand a committed batch on (after the acks: alerts never hold up the stream)."""
        if self.on_batch is None:
            return
        try:
            self.on_batch([(i.topic, i.envelope) for i in batch])
        except Exception:  # a bug there must not stop the writer
            log.exception("batch observer failed")

    async def _write(self, batch: list[_Item]) -> None:
        """Write ``batch``; if the database refuses its data, bisect to the culprit and
        dead-letter it, so one bad message neither blocks the stream nor loops forever."""
        rows = [(i.topic, i.envelope) for i in batch]
        try:
            result = await self._retrying(functools.partial(self.store.write_batch, rows))
            self.skewed += result.skewed
        except StoreRejectedError as exc:
            if len(batch) > 1:
                half = len(batch) // 2
                await self._write(batch[:half])
                await self._write(batch[half:])
                return
            item = batch[0]
            log.error("database refused message %s on %s: %s", item.envelope.id, item.topic, exc)
            await self._dead_letters([_Dead(item.topic, item.envelope.to_json(),
                                            f"database refused it: {exc}", item.on_commit)])

    async def _dead_letters(self, letters: list[_Dead]) -> None:
        """Write dead letters in one transaction; if refused, one by one to the culprit."""
        rows = [(d.topic, d.payload, d.reason) for d in letters]
        try:
            await self._retrying(functools.partial(self.store.dead_letters, rows))
        except StoreRejectedError as exc:
            if len(letters) > 1:
                for letter in letters:
                    await self._dead_letters([letter])
                return
            d = letters[0]  # not even storable as a dead letter: log it all
            log.error("dropping message on %s (%s); dead letter refused: %s; payload %r",
                      d.topic, d.reason, exc, d.payload[:2000])
        self.dead_lettered += len(letters)

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` until it succeeds; StoreRejectedError is raised, not retried."""
        attempt = 0
        while True:
            try:
                result = await op()
            except StoreRejectedError:
                raise
            except StoreError as exc:
                if not self.degraded:
                    log.error("database write failed, holding acknowledgements: %s", exc)
                self.degraded = True
                self.last_error = str(exc)
                delay = backoff_delay(attempt, self.retry_min, self.retry_max)
                attempt += 1
                self.beat()  # retrying a database that is away is progress, not a hang
                await asyncio.sleep(delay)
                continue
            except Exception as exc:
                # Not the database being away: retrying would stall every message behind
                # this one, so it is isolated and dead-lettered like refused data.
                log.exception("unexpected error writing to the store")
                raise StoreRejectedError(f"{type(exc).__name__}: {exc}") from exc
            if self.degraded:
                log.info("database writes succeed again")
            self.degraded = False
            self.last_error = ""
            return result
