"""Batches messages into store transactions and settles each one only after the commit.

MQTT deliveries and HTTP pushes both land here. One writer task takes whatever has
queued since its last transaction (up to ``batch_max``) and writes it as one batch, so
load makes batches bigger instead of making the database busier; in a backlog (or for
HTTP pushes, whose senders wait) up to ``OVERLAP`` batches, no two with the same robot,
are in the database at once, and messages are settled in the order they came. While
the database is down the batch is retried with backoff and nothing is acknowledged: the
broker (or the IoT Rule's HTTP retry) holds the messages for us.

Each message ends in one ``Settled`` outcome, told to whoever waits for it: ``stored``,
``duplicate`` (its id was already stored: an idempotent retry) or ``dead_lettered``
(with the reason). HTTP pushes wait with a deadline and are retried by their sender
while the database is away, so they are held by key (org and envelope id, or the dead
letter's digest): a retry of a pending message joins it instead of queueing a second
copy, and at most ``pending_max`` are held (``PendingFullError`` beyond: a 503).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from bridge.backoff import backoff_delay
from bridge.envelope import Envelope
from bridge.errors import StoreError, StoreFullError, StoreRejectedError
from bridge.service.sdnotify import BEAT_SECONDS
from bridge.service.taskset import within
from callback_server.store import BatchStore

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Told of each committed batch (the alert engine): ``(topic, envelope)`` pairs.
OnBatch = Callable[[list[tuple[str, Envelope]]], None]
#: What HTTP ingest holds at most by default while the database is away (INGEST_PENDING_MAX).
DEFAULT_PENDING_MAX = 10_000
#: Batches written at once (each on its own connection, each of its own robots; their
#: messages settled in the order they came). Measured (bench consumer, 50,000
#: envelopes, MariaDB): 1: 3,300/s, 2: 4,250/s, 3: 4,900-5,000/s, 4: 5,600/s. Three
#: leave one of the MySQL pool's default four connections to the read API, the console
#: and the alert engine.
OVERLAP = 3
#: Robots one batch may take even when that is more than its third. Split finer, the
#: few dozen robots of HTTP pushes only make more, smaller transactions (bench
#: ingest_http, 64 POSTs at once: from 16, 1.08 statements and 325 µs of MariaDB's CPU
#: an envelope; from 128, 253 as before, and the same throughput); it is the
#: hundreds of robots in a backlog whose rows overlapping batches fought over.
SPLIT_MIN = 128
#: MQTT messages queued (for robots with no batch in flight) that make a backlog: split
#: into batches written side by side. Fewer wait for the commit in flight and go as one
#: batch: split, the ~150 messages a saturated pipeline queued during a batch went as a
#: batch of 128 robots and slivers, 47 rows a transaction; as one, 83, and the same
#: rows cost the callback server 9 % and MariaDB 15 % less CPU (bench pipeline,
#: BATCH_FRAMES=always, six alternated pairs: 4,221 -> 4,644 rows/s).
OVERLAP_MIN = 500
#: The longest wait between writes while the database's disk is full.
FULL_RETRY_SECONDS = 1.0
#: A robot: its org and sn (batches in flight share none).
Robot = tuple[str, str]


class Reason(StrEnum):
    """Why a message was dead-lettered: the first words of its reason (``"<reason>: why"``),
    and the label of the dead-letter metric."""

    UNREADABLE = "unreadable"  # the request body as a whole (400/413)
    MALFORMED = "malformed"  # not an envelope, or one the schema refuses
    INCONSISTENT = "inconsistent with its topic"  # org/device differ from the topic's
    REFUSED = "refused by the database"  # StoreRejectedError: retrying cannot help
    FOREIGN = "org not covered by the key"  # HTTP ingest with an org-scoped key
    OTHER = "other"

    def because(self, detail: str) -> str:
        """The full reason text kept with the dead letter and answered."""
        return f"{self.value}: {detail}"

    @classmethod
    def of(cls, reason: str) -> Reason:
        """The kind of a reason text (``OTHER`` for one not written by ``because``)."""
        head = reason.split(":", 1)[0]
        return next((r for r in cls if r.value == head), cls.OTHER)


class Outcome(StrEnum):
    """How one ingested message ended (the ``outcome`` of an ingest answer's result)."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # already stored: a retry or redelivery, nothing written twice
    HANDLED = "handled"  # gateway traffic (presence, telemetry, ...): handled in memory
    DEAD_LETTERED = "dead_lettered"  # kept in the dead-letter table, with ``reason``


@dataclass(frozen=True, slots=True)
class Settled:
    """One message's outcome; ``reason`` says why it was dead-lettered."""

    outcome: Outcome
    reason: str | None = None


OnCommit = Callable[[Settled], None]


class PendingFullError(StoreError):
    """HTTP ingest already holds ``limit`` messages for a database that does not commit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} messages already wait for the database "
                         "(INGEST_PENDING_MAX); retry later")
        self.limit = limit


@dataclass(slots=True)
class _Item:
    topic: str
    envelope: Envelope
    waiters: list[OnCommit]
    key: Hashable | None = None  # held by this key (HTTP ingest) until settled
    outcome: Settled | None = None  # committed, waiting for those before it to be


@dataclass(slots=True)
class _Dead:
    topic: str
    payload: bytes
    reason: str
    waiters: list[OnCommit]
    key: Hashable | None = None


@dataclass(slots=True)
class _Counts:
    """What the writer has settled since start (health and /metrics show these)."""

    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    by_reason: collections.Counter[Reason] = field(default_factory=collections.Counter)


def dead_key(topic: str, payload: bytes) -> str:
    """A dead letter's identity: the store keeps the same topic and payload once."""
    return hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\0" + payload).hexdigest()


def _settle(waiters: list[OnCommit], settled: Settled) -> None:
    for waiter in waiters:
        try:
            waiter(settled)
        except Exception:  # one bad callback must not cost the others their answer
            log.exception("settling a message failed")


class BatchWriter:
    """One writer task in front of the store (up to ``OVERLAP`` batches in flight)."""

    def __init__(
        self, store: BatchStore, *, batch_max: int = 2000, retry_min: float = 0.2,
        retry_max: float = 10.0, beat: Callable[[], None] = lambda: None,
        pending_max: int = DEFAULT_PENDING_MAX,
    ) -> None:
        self.store = store
        self.batch_max = batch_max
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.pending_max = pending_max
        self.beat = beat  # the watchdog's heartbeat: stamped every iteration, idle or not
        self.on_batch: OnBatch | None = None
        self.degraded = False
        self.last_error = ""
        self.counts = _Counts()
        self.batches = 0
        self.skewed = 0
        self.joined = 0  # HTTP retries that joined a message already pending
        self.refused_full = 0  # HTTP requests answered 503 because pending_max was reached
        #: The database's disk is full (the last write failed on it): HTTP ingest is
        #: refused at once until a write succeeds again. None: not full.
        self.full: StoreFullError | None = None
        self.refused_disk_full = 0  # HTTP requests answered 503 at once for a full disk
        self._http_waits: set[asyncio.Future[Settled]] = set()  # settle()'s, unresolved
        #: monotonic time of the last commit, or of the first wait since: a stall shows here
        self.last_progress = time.monotonic()
        self._items: collections.deque[_Item] = collections.deque()
        self._writing = 0  # items taken from _items, their batch not yet settled
        self._dead: collections.deque[_Dead] = collections.deque()
        self._held: dict[Hashable, _Item | _Dead] = {}  # HTTP ingest, by key, until settled
        self._wake = asyncio.Event()
        #: Resolved by an HTTP push while the writer waits with a batch slot free.
        self._pushed: asyncio.Future[None] | None = None
        self._progress = asyncio.Event()  # set after each commit (drain waits on it)

    @property
    def stored(self) -> int:
        return self.counts.stored

    @property
    def duplicates(self) -> int:
        return self.counts.duplicates

    @property
    def dead_lettered(self) -> int:
        return self.counts.dead_lettered

    @property
    def pending(self) -> int:
        return len(self._items) + len(self._dead) + self._writing

    @property
    def held(self) -> int:
        """HTTP ingest messages waiting for a commit (at most ``pending_max``)."""
        return len(self._held)

    def submit(self, topic: str, envelope: Envelope, on_commit: OnCommit) -> None:
        """Queue a message; ``on_commit`` is told its outcome once that is committed."""
        self._waiting()
        self._items.append(_Item(topic, envelope, [on_commit]))
        self._wake.set()

    def submit_dead(self, topic: str, payload: bytes, reason: str, on_commit: OnCommit) -> None:
        """Queue a message we cannot use for the dead-letter table, with why."""
        self._waiting()
        self._dead.append(_Dead(topic, payload, reason, [on_commit]))
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

    async def write(self, items: Sequence[tuple[str, Envelope]]) -> list[Settled]:
        """Queue several messages and wait for their outcomes (see ``settle``)."""
        settled, _ = await self.settle(items, ())
        return settled

    async def settle(
        self, items: Sequence[tuple[str, Envelope]],
        dead: Sequence[tuple[str, bytes, str]],
    ) -> tuple[list[Settled], list[Settled]]:
        """HTTP ingest: hold ``items`` (to store) and ``dead`` (``topic, payload, reason``
        to dead-letter) by key and wait until each is settled; the outcomes in order.

        A message already held under its key is joined, not queued again. If the new
        ones would take more than ``pending_max`` places, nothing is queued and
        PendingFullError is raised. Cancelled (the caller's deadline), the messages stay
        queued and are written once the database answers; only the wait is dropped.

        While the database's disk is full, StoreFullError at once, before anything is
        queued: a caller must not wait out its deadline on a write that cannot succeed
        (the batch the disk refused is retried, and a success ends it). A wait under
        way when the disk fills ends with it too; its messages stay queued.
        """
        if self.full is not None:
            self.refused_disk_full += 1
            raise StoreFullError(self.full.detail)
        keys: list[Hashable] = [("envelope", e.org, e.id) for _, e in items]
        keys += [("dead", dead_key(topic, payload)) for topic, payload, _ in dead]
        new = len({k for k in keys if k not in self._held})
        if new and len(self._held) + new > self.pending_max:
            self.refused_full += 1
            raise PendingFullError(self.pending_max)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Settled]] = []
        joined: list[tuple[_Item | _Dead, OnCommit]] = []
        specs: list[tuple[str, Envelope] | tuple[str, bytes, str]] = [*items, *dead]
        for key, spec in zip(keys, specs, strict=True):
            future: asyncio.Future[Settled] = loop.create_future()
            waiter: OnCommit = functools.partial(_resolve, future)
            futures.append(future)
            held = self._held.get(key)
            if held is not None:
                self.joined += 1
            else:
                self._waiting()
                if len(spec) == 2:
                    held = _Item(spec[0], spec[1], [], key)
                    self._items.append(held)
                else:
                    held = _Dead(spec[0], spec[1], spec[2], [], key)
                    self._dead.append(held)
                self._held[key] = held
            held.waiters.append(waiter)
            joined.append((held, waiter))
        self._http_waits.update(futures)
        self._wake.set()
        if self._pushed is not None and not self._pushed.done():
            self._pushed.set_result(None)
        try:
            if len(futures) == 1:  # one per POST, as AWS IoT rules send: no gather
                outcomes = [await futures[0]]
            else:
                outcomes = list(await asyncio.gather(*futures))
        finally:
            for held, waiter in joined:  # a timed-out wait must not pile up on the item
                if waiter in held.waiters:
                    held.waiters.remove(waiter)
            for future in futures:
                self._http_waits.discard(future)
                if future.done() and not future.cancelled():
                    future.exception()  # seen: gather raised only the first of them
        seen: set[Hashable] = set()
        for i, key in enumerate(keys):  # the same message twice in one request: stored once
            if key in seen and outcomes[i].outcome is Outcome.STORED:
                outcomes[i] = Settled(Outcome.DUPLICATE)
            seen.add(key)
        return outcomes[:len(items)], outcomes[len(items):]

    async def run(self) -> None:
        """Write batches until cancelled."""
        while True:
            self.beat()
            if not await within(self._wake.wait(), BEAT_SECONDS):
                continue
            self._wake.clear()
            await self._write_dead()
            await self._write_items()

    async def _write_dead(self) -> None:
        """Write the queued dead letters and settle them."""
        while self._dead:
            n = min(len(self._dead), self.batch_max)
            letters = [self._dead[i] for i in range(n)]
            await self._dead_letters(letters)
            for _ in range(n):
                self._dead.popleft()
            self._committed()
            for dead in letters:
                self._finish(dead, Settled(Outcome.DEAD_LETTERED, dead.reason))

    async def _write_items(self) -> None:
        """Write what is queued, up to ``OVERLAP`` batches at a time, and settle each
        message once it and every message before it are committed (acknowledgements keep
        the order of arrival, as MQTT asks). In a backlog, while one batch waits for the
        database the next ones are built and sent: with one at a time, a third of the
        callback server's time was spent waiting while it drained.

        Batches in flight share no robot: a robot's next messages wait for its batch in
        flight to commit, so no batch waits in the database for another's locks on the
        robot rows, and a robot's batches commit in order (the store would leave the
        same tables in any order: write_batch)."""
        queued: dict[Robot, collections.deque[_Item]] = {}  # oldest robot first
        busy: dict[asyncio.Task[list[Settled]], tuple[list[_Item], set[Robot]]] = {}
        writing: set[Robot] = set()  # robots with a batch in flight
        taken: collections.deque[_Item] = collections.deque()  # arrival order, unsettled
        try:
            while self._items or taken:
                # Between batches, not only once the stream pauses: an HTTP caller waits
                # for its dead letter's answer, and MQTT for its acknowledgement.
                await self._write_dead()
                while self._items:
                    item = self._items.popleft()
                    taken.append(item)
                    robot = (item.envelope.org, item.envelope.device)
                    if (mine := queued.get(robot)) is None:
                        queued[robot] = mine = collections.deque()
                    mine.append(item)
                self._writing = len(taken)
                while len(busy) < OVERLAP:
                    split = _backlog(queued, writing, min(OVERLAP_MIN, self.batch_max))
                    if busy and not split:
                        break  # joins the next commit's batch: fewer, bigger transactions
                    batch, robots = self._take(queued, writing, split=split)
                    if not batch:
                        break
                    writing |= robots
                    busy[asyncio.create_task(
                        self._write(batch), name=f"batch-{self.batches + len(busy)}",
                    )] = (batch, robots)
                # Waits for a commit, not for the next message: what arrives meanwhile
                # makes the next batch bigger rather than the database busier. An HTTP
                # push with a slot free starts one at once: its sender waits for the
                # answer, and a few dozen senders keep no backlog to batch.
                waits: set[asyncio.Future[Any]] = set(busy)
                if len(busy) < OVERLAP:
                    self._pushed = asyncio.get_running_loop().create_future()
                    waits.add(self._pushed)
                try:
                    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if self._pushed is not None:
                        self._pushed.cancel()
                        self._pushed = None
                for task in [task for task in busy if task in done]:
                    batch, robots = busy.pop(task)
                    writing -= robots
                    for item, settled in zip(batch, task.result(), strict=True):
                        item.outcome = settled
                    self.batches += 1
                    self._committed()
                self._settle_ready(taken)
        finally:  # cancelled (stopping): what was not settled is queued again, in order
            for task in busy:
                task.cancel()
            for item in taken:
                item.outcome = None
            self._items.extendleft(reversed(taken))
            self._writing = 0

    def _settle_ready(self, taken: collections.deque[_Item]) -> None:
        """Settle the committed messages no uncommitted one came before, in order."""
        ready: list[tuple[_Item, Settled]] = []
        while taken and (settled := taken[0].outcome) is not None:
            ready.append((taken.popleft(), settled))
        self._writing = len(taken)
        for item, settled in ready:
            self._finish(item, settled)
        self._tell([item for item, settled in ready
                    if settled.outcome is not Outcome.DEAD_LETTERED])

    def _take(self, queued: dict[Robot, collections.deque[_Item]], writing: set[Robot], *,
              split: bool) -> tuple[list[_Item], set[Robot]]:
        """The next batch: the queued messages of the robots waited for longest that
        have no batch in flight, up to ``batch_max``; if ``split``, only to a third (1 /
        ``OVERLAP``) of the robots with messages queued or in flight, but at least
        ``SPLIT_MIN``. In a backlog the robots settle into three batches of a third
        each, one replacing the other as it commits, not one batch of all of them that
        the next would wait for."""
        share = (max(-(-len(queued.keys() | writing) // OVERLAP), SPLIT_MIN) if split
                 else len(queued))
        batch: list[_Item] = []
        robots: set[Robot] = set()
        for robot in [robot for robot in queued if robot not in writing][:share]:
            mine = queued[robot]
            room = self.batch_max - len(batch)
            if len(mine) <= room:
                batch += mine
                del queued[robot]
            else:
                batch += [mine.popleft() for _ in range(room)]
            robots.add(robot)
            if len(batch) >= self.batch_max:
                break
        return batch, robots

    def _committed(self) -> None:
        self.last_progress = time.monotonic()
        self._progress.set()

    def _finish(self, item: _Item | _Dead, settled: Settled) -> None:
        """Count ``item``'s outcome, release its key and tell everyone waiting for it."""
        counts = self.counts
        if settled.outcome is Outcome.STORED:
            counts.stored += 1
        elif settled.outcome is Outcome.DUPLICATE:
            counts.duplicates += 1
        else:
            counts.dead_lettered += 1
            counts.by_reason[Reason.of(settled.reason or "")] += 1
        if item.key is not None:
            self._held.pop(item.key, None)
        waiters, item.waiters = item.waiters, []
        _settle(waiters, settled)

    def _tell(self, batch: list[_Item]) -> None:
        """Hand a committed batch on (after the acks: alerts never hold up the stream)."""
        if self.on_batch is None or not batch:
            return
        try:
            self.on_batch([(i.topic, i.envelope) for i in batch])
        except Exception:  # a bug there must not stop the writer
            log.exception("batch observer failed")

    async def _write(self, batch: list[_Item]) -> list[Settled]:
        """Write ``batch``, each item's outcome in order; if the database refuses its
        data, bisect to the culprit and dead-letter it, so one bad message neither blocks
        the stream nor loops forever."""
        rows = [(i.topic, i.envelope) for i in batch]
        try:
            result = await self._retrying(functools.partial(self.store.write_batch, rows))
        except StoreRejectedError as exc:
            if len(batch) > 1:
                half = len(batch) // 2
                return await self._write(batch[:half]) + await self._write(batch[half:])
            item = batch[0]
            log.error("database refused message %s on %s: %s", item.envelope.id, item.topic, exc)
            reason = Reason.REFUSED.because(str(exc))
            await self._dead_letters([_Dead(item.topic, item.envelope.to_json(), reason, [])])
            return [Settled(Outcome.DEAD_LETTERED, reason)]
        self.skewed += result.skewed
        seen = result.duplicate_ids
        return [Settled(Outcome.DUPLICATE if i.envelope.id in seen else Outcome.STORED)
                for i in batch]

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

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` until it succeeds; StoreRejectedError is raised, not retried."""
        attempt = 0
        while True:
            try:
                result = await op()
            except StoreRejectedError:
                raise
            except StoreError as exc:
                if isinstance(exc, StoreFullError):
                    self._disk_full(exc)
                if not self.degraded:
                    log.error("database write failed, holding acknowledgements: %s",
                              exc.detail if isinstance(exc, StoreFullError) else exc)
                self.degraded = True
                self.last_error = str(exc)
                delay = backoff_delay(attempt, self.retry_min, self.retry_max)
                if isinstance(exc, StoreFullError):
                    # A local file's write is cheap to try: space freed is used within
                    # a second, not after a back-off grown while the disk was full.
                    delay = min(delay, FULL_RETRY_SECONDS)
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
            self.full = None
            return result

    def _disk_full(self, exc: StoreFullError) -> None:
        """The disk is full: refuse HTTP ingest from now on (``settle``) and end the waits
        under way, whose messages stay queued (a retry joins them)."""
        self.full = exc
        waits, self._http_waits = self._http_waits, set()
        for future in waits:
            if not future.done():
                future.set_exception(StoreFullError(exc.detail))


def _resolve(future: asyncio.Future[Settled], settled: Settled) -> None:
    if not future.done():
        future.set_result(settled)


def _backlog(queued: dict[Robot, collections.deque[_Item]], writing: set[Robot],
             enough: int) -> bool:
    """Whether what is queued for robots with no batch in flight is worth batches in
    parallel: ``enough`` messages, or an HTTP push (its sender waits for the answer, and
    a few dozen senders keep no backlog to batch)."""
    n = 0
    for robot, mine in queued.items():
        if robot in writing:
            continue
        n += len(mine)
        if n >= enough or any(item.key is not None for item in mine):
            return True
    return False
