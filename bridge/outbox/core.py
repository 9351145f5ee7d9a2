"""The outbox itself. Durable outbox: SQLite in WAL mode, one writer thread doing group commits.

A webhook is answered 200 only after its message is committed here; the publisher
removes an entry only after the broker's PUBACK. Every write (puts and removals) goes
through one writer thread that takes everything queued since its last commit into one
transaction, so N concurrent webhooks cost one fsync, not N (docs/measured.md: fdatasync
runs ~4.5k/s on this disk).

Bounded: at ``max_entries`` superseded entries that carry a ``compact_key`` (pose and
power state of one robot) are compacted to the newest; if that frees nothing the put
fails with OutboxFullError and the webhook answers 503 + Retry-After. Status changes
and events are never dropped.

Removals ride along: an acknowledged entry's removal waits (at most ``remove_delay``)
for the next write, usually the next callback's put, instead of a transaction of its
own: at a trickle, one callback after another, each cost two commits (two fsyncs of an
SD card) where it costs one now. Losing a waiting removal (a crash) only causes a
resend. Until its removal is written (later still while the disk is full) an entry is
left out of every read, so it is not sent again; closing writes what waits.

Refused: an entry the broker refuses for good (MQTT 5 PUBACK "not authorised", bad
topic, ...) is moved to a ``rejected`` table, so one poison message does not hold up
everything behind it; ``requeue_rejected`` puts them back once the cause is fixed. That
table keeps the newest ``max_rejected`` entries (a warning is logged for each it drops).

Tail: the entries committed since the publisher last caught up are also kept in memory
(bounded), so a publisher that keeps up reads what it publishes from there instead of
from SQLite through a worker thread; that SELECT and its thread hand-offs were ~60 us
per put at 2k puts/s (measured). Anything else that changes the stored order or set
(compaction, rejection, requeue, a failed write) drops the tail, and peeks go to SQLite
until one of them reaches the end again.

Held: a put with ``hold=True`` goes to the ``held`` table instead, one row per
``compact_key``, the newest by ``order`` (the robot time) winning: the edge's downsampler
(edge_agent/downsample.py) holds the latest pose of a robot there until its interval
ends, then ``release`` moves it into the outbox. It is in SQLite, not only in memory, so
a callback answered 200 survives a crash during its interval: ``release()`` with no keys,
at start, sends whatever was held. Held rows are bounded by robots x channels.

Disk full: a write that fails (``SQLITE_FULL``/``ENOSPC``, ``SQLITE_IOERR``/``EIO``, any
SQLite error) fails only the puts of that transaction (503 + Retry-After) and marks the
outbox ``unwritable`` with the reason; from then on a put is refused at once, before it
reaches the writer, and the writer retries every ``retry_seconds``: the removals,
rejections and releases of the failed transaction (kept, not lost) plus a small probe
write. The first write that commits clears the mark and puts are accepted again, with no
restart (a restart would not free the disk). No put waits more than ``write_timeout`` for
its commit: a writer stuck on a dying SD card answers 503 too, and a callback that did
commit after all is a duplicate on its retry (its body hash), answered 200.

Deduplication: each put may carry keys (Pudu ``TraceId``, a body hash); a put whose key
was seen within ``dedup_ttl`` seconds is reported as a duplicate and stores nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from bridge.errors import (
    OutboxError,
    OutboxFullError,
    OutboxLockedError,
    OutboxUnwritableError,
)
from bridge.outbox import dedup, priority
from bridge.outbox import held as held_table
from bridge.outbox import rejected as rejected_table
from bridge.outbox.compaction import Compaction
from bridge.outbox.entries import (
    STOP,
    OutboxEntry,
    PutResult,
    _Commit,
    _Put,
    _Reject,
    _Release,
    _Remove,
    _Requeue,
)
from bridge.outbox.numbers import Numbers
from bridge.outbox.schema import SCHEMA
from bridge.outbox.tail import Tail
from bridge.service.private_files import prepare_sqlite_file

log = logging.getLogger(__name__)

#: Seconds an acknowledged entry's removal waits for the next write to ride with.
REMOVE_DELAY = 1.0


class Outbox:
    """An async context manager over one SQLite file."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_entries: int = 1_000_000,
        dedup_ttl: float = 3600.0,
        max_batch: int = 2000,
        max_rejected: int = 10_000,
        retry_seconds: float = 1.0,
        write_timeout: float = 5.0,
        remove_delay: float = REMOVE_DELAY,
    ) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self.dedup_ttl = dedup_ttl
        self.max_batch = max_batch
        self.max_rejected = max_rejected
        self.retry_seconds = retry_seconds
        self.write_timeout = write_timeout
        self.remove_delay = remove_delay
        #: Why the last write failed (disk full, I/O error); None while writes commit.
        self.unwritable: str | None = None
        self.write_failures = 0  # transactions that failed since start
        self.depth = 0
        self.rejected = 0
        self.held = 0  # entries in the held table (not yet in the outbox)
        self.oldest_at: float | None = None  # created_at of the oldest entry, if any
        self.commits = 0
        self.compacted = 0
        self.rejected_full = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = asyncio.Lock()
        # A read goes on in its thread when the task awaiting it is cancelled (stopping):
        # the reader is closed only once it is done (closing SQLite under a running
        # statement crashed the process).
        self._reader_guard = threading.Lock()
        self._changed = asyncio.Event()  # the publisher's: one consumer clears it
        self._empty = asyncio.Event()  # set while nothing waits in the outbox
        self._last_prune = 0.0
        self._fatal: BaseException | None = None
        self._tail = Tail()
        self._drain_order = priority.DrainOrder()
        self._ops: list[Any] = []  # queued in this loop tick, not yet handed to the writer
        self._removals: list[int] = []  # acknowledged, waiting for the next write
        self._removal_timer: asyncio.TimerHandle | None = None
        self._unwritten: set[int] = set()  # removals asked for and not yet committed
        self._commits_seen = 0  # commits with new entries that reached the event loop
        self._lock_fd: int | None = None
        self._retry: list[Any] = []  # writer thread: ops without a future from a failed write
        self._numbers = Numbers()  # writer thread: the new entries' seqs
        self._compaction = Compaction(self._delete)  # writer thread: what the bound may drop

    # -- lifecycle ------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so a 200 survives a power cut.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _take_lock(self) -> None:
        """An exclusive lock on ``{path}.lock`` for as long as we are open: a second agent
        on the same file would publish and delete the same entries twice."""
        prepare_sqlite_file(self.path)  # the directory, and the file 0600 (its WAL too)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # a lock file left 0644 from before is tightened too
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutboxLockedError(str(self.path)) from None
        self._lock_fd = fd

    async def __aenter__(self) -> Outbox:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._take_lock)
            writer = await asyncio.to_thread(self._open_writer)
            self._reader = await asyncio.to_thread(self._connect)
        except (sqlite3.Error, OSError) as exc:
            self._release_lock()
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc
        self._thread = threading.Thread(
            target=self._writer_loop, args=(writer,), name="outbox-writer", daemon=True
        )
        self._thread.start()
        if self.depth:
            log.info("outbox %s holds %d entries from before; resuming", self.path, self.depth)
            self._changed.set()
        return self

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.executescript(SCHEMA)
        priority.migrate(conn)
        self.depth = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self.rejected = conn.execute("SELECT COUNT(*) FROM rejected").fetchone()[0]
        self.held = conn.execute("SELECT COUNT(*) FROM held").fetchone()[0]
        self.oldest_at = self._oldest(conn)
        return conn

    @staticmethod
    def _oldest(conn: sqlite3.Connection) -> float | None:
        """created_at of the first entry in seq order (the primary key: one index step)."""
        row = conn.execute("SELECT created_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def free_bytes(self) -> int | None:
        """Free space for us on the outbox's filesystem (None if it cannot be read)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    @property
    def oldest_age_s(self) -> float:
        """How long the oldest entry has waited (0 when empty): how stale the uplink is."""
        return 0.0 if self.oldest_at is None else max(0.0, time.time() - self.oldest_at)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._flush()
            self._queue.put(STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._reader is not None:
            await asyncio.to_thread(self._close_reader)
        self._release_lock()

    def _close_reader(self) -> None:
        with self._reader_guard:  # after a read still running, before any other
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- public API (event loop) ----------------------------------------------------------
    async def put(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        compact_key: str | None = None,
        dedup_keys: Sequence[dedup.Key] = (),
        hold: bool = False,
        order: float = 0.0,
    ) -> PutResult:
        """Store durably; returns once committed. OutboxFullError when at the bound.

        ``hold``: keep it in the held table under ``compact_key`` (required) until
        ``release``; of two held under one key the one with the greater ``order`` stays
        (the later put on a tie). Queued synchronously, before the first await, so puts
        and releases reach the writer in the order they were called."""
        if self._fatal is not None:
            raise OutboxError(f"outbox writer failed: {self._fatal}")
        if self.unwritable is not None:  # at once: the writer retries on its own
            raise OutboxUnwritableError(self.unwritable)
        if hold and compact_key is None:
            raise ValueError("a held put needs a compact_key")
        fut: asyncio.Future[PutResult] = asyncio.get_running_loop().create_future()
        self._submit(_Put(topic, payload, qos, retain, compact_key, tuple(dedup_keys), fut,
                          hold, order))
        return await fut

    def release(self, keys: Iterable[str]) -> None:
        """Move what is held under ``keys`` into the outbox (not awaited: it stays held,
        durably, if this is lost, and the next start releases it)."""
        batch = tuple(keys)
        if batch:
            self._submit(_Release(batch, None))

    async def sync(self) -> None:
        """Wait until everything queued before this call is committed."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._submit(_Release((), fut))
        await fut

    async def release_all(self) -> int:
        """Move everything held into the outbox (at start: a crash left it there)."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._submit(_Release(None, fut))
        return await fut

    def remove(self, seqs: Iterable[int]) -> None:
        """Drop acknowledged entries (not awaited: losing a removal only causes a resend),
        with the next write or within ``remove_delay``."""
        batch = list(seqs)
        if not batch:
            return
        for seq in batch:
            self._tail.discard(seq)
        self._unwritten.update(batch)
        if self._loop is None:
            self._submit(_Remove(batch))
            return
        self._removals += batch
        if self._ops or self._removal_timer is not None:
            return  # a flush is due this tick (it takes them), or the timer is armed
        self._removal_timer = self._loop.call_later(self.remove_delay, self._flush)

    def reject(self, seq: int, reason: str) -> None:
        """Move an entry the broker refuses for good out of the way (kept, not dropped)."""
        self._tail.discard(seq)
        self._submit(_Reject(seq, reason))

    async def requeue_rejected(self) -> int:
        """Put every rejected entry back at the end of the outbox; returns how many."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._submit(_Requeue(fut))
        return await fut

    async def peek(self, after_seq: int, limit: int = 500) -> list[OutboxEntry]:
        """The oldest entries with ``seq > after_seq``, in order."""
        if self._tail.covers(after_seq):
            return self._tail.peek(after_seq, limit)
        skip = set(self._unwritten)
        fetch = limit + len(skip)  # enough left once those are left out
        async with self._read_lock:
            seen = self._commits_seen
            rows = await asyncio.to_thread(self._read, after_seq, fetch)
        gone = self._left_out(skip)
        entries = [OutboxEntry(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows
                   if r[0] not in gone][:limit]
        if len(rows) < fetch and seen == self._commits_seen and self._tail.start is None:
            # This read saw every committed entry after after_seq, and no commit reached
            # the loop meanwhile, so each later one will: track from here.
            self._tail.track_from(rows[-1][0] if rows else after_seq)
        return entries

    async def drain_plan(self, limit: int = 500) -> list[tuple[OutboxEntry, bool]]:
        """While a backlog exists: up to ``limit`` entries in drain order (newest state
        and events first, then history), each with whether it is history; see
        bridge/outbox/priority.py. Entries removed and not yet written are left out."""
        skip = set(self._unwritten)
        async with self._read_lock:
            rows = await asyncio.to_thread(self._plan, limit + len(skip))
        gone = self._left_out(skip)
        return [(OutboxEntry(r[0], r[1], bytes(r[2]), r[3], bool(r[4])), replay)
                for r, replay in rows if r[0] not in gone][:limit]

    def _left_out(self, skip: set[int]) -> set[int]:
        """What a read from SQLite must leave out: the removals not written as it started
        (``skip``: one committed while it ran leaves ``_unwritten``, not the read's rows),
        and those asked for since."""
        return skip | self._unwritten if self._unwritten else skip

    def _plan(self, limit: int) -> list[tuple[tuple[Any, ...], bool]]:
        with self._reader_guard:
            if self._reader is None:  # closed: the caller was cancelled, nobody reads this
                return []
            return self._drain_order.plan(self._reader, limit)

    def _submit(self, op: Any) -> None:
        """Queue an op for the writer; everything queued in one loop tick goes over as one.

        Waking the writer thread per put cost a futex call and a GIL hand-off each.
        """
        if self._loop is None:
            self._queue.put([op])
            return
        if not self._ops:
            self._loop.call_soon(self._flush)
        self._ops.append(op)

    def _flush(self) -> None:
        if self._removal_timer is not None:
            self._removal_timer.cancel()
            self._removal_timer = None
        if self._removals:  # first: they were asked for before anything of this tick
            self._ops.insert(0, _Remove(self._removals))
            self._removals = []
        if self._ops:
            ops, self._ops = self._ops, []
            if self._fatal is not None:  # nobody would ever answer them
                self._fail(ops, self._fatal)
                return
            self._queue.put(ops)
            puts = [op.future for op in ops if type(op) is _Put]
            if puts and self._loop is not None:  # one timer per batch, not per put
                self._loop.call_later(self.write_timeout, self._expire, puts)

    def _expire(self, puts: list[asyncio.Future[PutResult]]) -> None:
        """Event loop: puts of a batch still not committed after ``write_timeout`` are
        answered 503 now, and later puts at once, until the writer commits again."""
        late = [fut for fut in puts if not fut.done()]
        if not late:
            return
        reason = f"no commit within {self.write_timeout:g} s"
        if self.unwritable is None:
            log.error("outbox %s: %s; refusing callbacks (503) until the writer commits",
                      self.path, reason)
            self.unwritable = reason
        for fut in late:
            fut.set_exception(OutboxUnwritableError(reason))

    @staticmethod
    def _fail(ops: list[Any], exc: BaseException) -> None:
        err = OutboxError(f"outbox writer failed: {exc}")
        for op in ops:
            fut = getattr(op, "future", None)
            if fut is not None and not fut.done():
                fut.set_exception(err)

    def _read(self, after_seq: int, limit: int) -> list[tuple[Any, ...]]:
        with self._reader_guard:
            if self._reader is None:  # closed: the caller was cancelled, nobody reads this
                return []
            return self._reader.execute(
                "SELECT seq, topic, payload, qos, retain FROM outbox"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()

    async def wait_empty(self) -> None:
        """Wait until nothing waits in the outbox (any number of waiters; flush_outbox)."""
        if self.depth:
            self._empty.clear()
            await self._empty.wait()

    async def wait_changed(self) -> None:
        """Wait until something was added (or removed) since the last call, or ``wake``."""
        await self._changed.wait()
        self._changed.clear()

    def wake(self) -> None:
        """End a ``wait_changed`` now (the publisher, when a resend became due)."""
        self._changed.set()

    # -- writer thread ------------------------------------------------------------------
    def _writer_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                try:
                    first = self._queue.get(
                        timeout=self.retry_seconds if self.unwritable else None)
                except queue.Empty:
                    self._apply(conn, [])  # retry what failed, with a probe write
                    continue
                if first is STOP:
                    return
                ops = list(first)
                stop = False
                while len(ops) < self.max_batch:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is STOP:
                        stop = True
                        break
                    ops += more
                self._apply(conn, ops)
                if stop:
                    return
        except BaseException as exc:  # the writer must never die silently
            log.exception("outbox writer failed")
            self._fatal = exc
            self._drain_with_error(exc)
        finally:
            conn.close()

    def _drain_with_error(self, exc: BaseException) -> None:
        while True:
            try:
                ops = self._queue.get_nowait()
            except queue.Empty:
                return
            if ops is STOP:
                continue
            err = OutboxError(f"outbox writer failed: {exc}")
            failed = [(op.future, err) for op in ops
                      if isinstance(op, (_Put, _Requeue, _Release)) and op.future is not None]
            self._resolve(_Commit(failed, [], True, []))

    def _apply(self, conn: sqlite3.Connection, ops: list[Any]) -> None:
        results: list[tuple[asyncio.Future[Any], Any]] = []
        added: list[OutboxEntry] = []
        removed: list[int] = []
        reordered = False
        now = time.time()
        depth, held = self.depth, self.held
        if self._retry:  # kept from a failed write, in their order, before the new ones
            ops, self._retry = [*self._retry, *ops], []
        try:
            conn.execute("BEGIN IMMEDIATE")
            if self.unwritable is not None:
                # A write of its own, so an idle outbox notices that space came back.
                dedup.mark(conn, ("outbox:write-probe",), now)
            i = 0
            while i < len(ops):
                op = ops[i]
                if type(op) is _Put and not op.hold:
                    run = _plain_puts(ops, i)
                    i += len(run)
                    if depth + len(run) < self.max_entries:  # no compaction: all at once
                        for put, outcome in zip(run, self._insert_run(conn, run, now, added),
                                                strict=True):
                            depth += outcome is PutResult.ACCEPTED
                            results.append((put.future, outcome))
                        continue
                    for put in run:
                        result, freed = self._insert(conn, put, now, depth, added)
                        depth -= freed
                        reordered = reordered or freed > 0
                        if result is PutResult.ACCEPTED:
                            depth += 1
                        results.append((put.future, result))
                    continue
                i += 1
                if type(op) is _Put:  # held
                    kept = self._hold(conn, op, now)
                    held += kept is PutResult.HELD
                    results.append((op.future, kept))
                    continue
                if isinstance(op, _Remove):
                    depth -= self._delete(conn, op.seqs)
                    removed += op.seqs
                    continue
                if isinstance(op, _Release):
                    moved, freed = self._release(conn, op.keys, now, depth, added)
                    depth += moved - freed
                    held -= moved
                    reordered = reordered or freed > 0
                    if op.future is not None:
                        results.append((op.future, moved))
                    continue
                reordered = True
                if isinstance(op, _Reject):
                    depth -= self._reject(conn, op, now)
                    continue
                moved = self._requeue(conn, now)
                depth += moved
                results.append((op.future, moved))
            if now - self._last_prune > 60:
                dedup.prune(conn, now - self.dedup_ttl, now)
                self._last_prune = now
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            results, depth, held = self._failed(conn, ops, exc)
            added, removed, reordered = [], [], True
        else:
            if self.unwritable is not None:
                log.warning("outbox %s writable again after %s; accepting",
                            self.path, self.unwritable)
                self.unwritable = None
        try:
            if any(isinstance(op, (_Reject, _Requeue)) for op in ops):  # rare: recount
                self.rejected = rejected_table.count(conn)
            if depth == 0:
                self.oldest_at = None
            elif (self.oldest_at is None or reordered
                  or any(not isinstance(op, _Put) for op in ops)):
                self.oldest_at = self._oldest(conn)
        except sqlite3.Error:  # reads only; they are right again after the next commit
            log.debug("outbox bookkeeping read failed", exc_info=True)
        self.depth, self.held = depth, held
        self.commits += 1
        self._resolve(_Commit(results, added, reordered, removed))

    def _failed(
        self, conn: sqlite3.Connection, ops: list[Any], exc: sqlite3.Error,
    ) -> tuple[list[tuple[asyncio.Future[Any], Any]], int, int]:
        """A transaction failed (disk full, I/O error): roll back, fail its awaited ops,
        keep the rest for the retry, and mark the outbox unwritable. Never raises: the
        writer thread must outlive a full disk."""
        self._numbers.forget()  # its lease, if it took one, is rolled back too
        self._compaction.forget()  # it may name entries rolled back
        try:
            if conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.debug("outbox rollback failed", exc_info=True)
        reason = _reason(exc)
        if self.unwritable is None:
            log.error("outbox %s cannot write (%s); refusing callbacks (503) and retrying "
                      "every %g s", self.path, reason, self.retry_seconds)
        self.unwritable = reason
        self.write_failures += 1
        err = OutboxUnwritableError(reason)
        keep = _disk_error(exc)  # anything else could fail again the same way, for ever
        results: list[tuple[asyncio.Future[Any], Any]] = []
        for op in ops:
            fut = getattr(op, "future", None)
            if fut is not None:
                results.append((fut, err))
            elif keep and not isinstance(op, _Put):
                self._retry.append(op)  # a removal, rejection or timed release
        try:
            depth = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            held = held_table.count(conn)
        except sqlite3.Error:
            depth, held = self.depth, self.held
        return results, depth, held

    @staticmethod
    def _delete(conn: sqlite3.Connection, seqs: list[int]) -> int:
        """Remove entries by seq, up to ``_ROWS_A_STATEMENT`` a statement (a statement per
        seq was the edge's largest cost of its own after the puts were written together:
        7 % of its samples, py-spy at saturation)."""
        removed = 0
        for i in range(0, len(seqs), _ROWS_A_STATEMENT):
            chunk = seqs[i:i + _ROWS_A_STATEMENT]
            removed += max(conn.execute(_delete_sql(len(chunk)), chunk).rowcount, 0)
        return removed

    def _reject(self, conn: sqlite3.Connection, op: _Reject, now: float) -> int:
        if not rejected_table.set_aside(conn, op.seq, op.reason, now, self.max_rejected):
            return 0
        return self._delete(conn, [op.seq])

    def _requeue(self, conn: sqlite3.Connection, now: float) -> int:
        moved = rejected_table.requeue(conn, now)
        self._numbers.forget()  # SQLite numbered them, past the lease
        return moved

    def _insert(
        self, conn: sqlite3.Connection, op: _Put, now: float, depth: int,
        added: list[OutboxEntry],
    ) -> tuple[PutResult | BaseException, int]:
        """Insert one entry (appended to ``added``); its result and how many were compacted."""
        if dedup.seen_of(conn, op.dedup_keys):
            return PutResult.DUPLICATE, 0
        freed = 0
        if depth >= self.max_entries:
            freed = self._make_room(conn, op.compact_key)
            if not freed:
                self.rejected_full += 1
                return OutboxFullError(depth, self.max_entries), 0
        seq = self._append(conn, op.topic, op.payload, op.qos, op.retain, op.compact_key, now,
                           op.order or None)
        dedup.mark(conn, op.dedup_keys, now)
        added.append(OutboxEntry(seq, op.topic, op.payload, op.qos, op.retain))
        return PutResult.ACCEPTED, freed

    def _insert_run(self, conn: sqlite3.Connection, puts: list[_Put], now: float,
                    added: list[OutboxEntry]) -> list[PutResult]:
        """``_insert`` for consecutive puts that need no room made, in three statements
        for all of them instead of three each (the retry keys looked up, the entries
        appended, the keys marked): at 3,000 puts/s those were ~20 % of the edge's CPU."""
        seen = dedup.seen_of(conn, (k for put in puts for k in put.dedup_keys))
        results: list[PutResult] = []
        fresh: list[_Put] = []
        for put in puts:
            if seen.intersection(put.dedup_keys):
                results.append(PutResult.DUPLICATE)  # a retry, or one earlier in this run
                continue
            seen.update(put.dedup_keys)
            fresh.append(put)
            results.append(PutResult.ACCEPTED)
        for i in range(0, len(fresh), _ROWS_A_STATEMENT):
            chunk = fresh[i:i + _ROWS_A_STATEMENT]
            first = self._numbers.take(conn, len(chunk))
            args: list[Any] = []
            for seq, p in enumerate(chunk, start=first):
                args += (seq, p.topic, p.payload, p.qos, int(p.retain), p.compact_key, now,
                         p.order or None)
            conn.execute(_append_sql(len(chunk)), args)
            added += [OutboxEntry(seq, p.topic, p.payload, p.qos, p.retain)
                      for seq, p in enumerate(chunk, start=first)]
            self._compaction.appended((p.compact_key for p in chunk), first)
        dedup.mark(conn, [k for p in fresh for k in p.dedup_keys], now)
        return results

    def _append(self, conn: sqlite3.Connection, topic: str, payload: bytes, qos: int,
                retain: bool, compact_key: str | None, now: float,
                order: float | None = None) -> int:
        seq = self._numbers.take(conn, 1)
        conn.execute(_append_sql(1), (seq, topic, payload, qos, int(retain), compact_key,
                                      now, order))
        self._compaction.appended((compact_key,), seq)
        return seq

    def _hold(self, conn: sqlite3.Connection, op: _Put, now: float) -> PutResult:
        """Into ``held`` (the newest by ``order`` stays); a retry is still a duplicate."""
        if dedup.seen_of(conn, op.dedup_keys):
            return PutResult.DUPLICATE
        assert op.compact_key is not None
        result = held_table.hold(conn, op.compact_key, op.topic, op.payload, op.qos,
                                 op.retain, op.order, now)
        dedup.mark(conn, op.dedup_keys, now)  # a retry of a superseded callback too
        return result

    def _release(
        self, conn: sqlite3.Connection, keys: tuple[str, ...] | None, now: float, depth: int,
        added: list[OutboxEntry],
    ) -> tuple[int, int]:
        """Held rows into the outbox, in the order they were held; (moved, compacted).

        Not refused at the bound (held rows are few, one per robot and channel):
        superseded state is compacted first if there is any."""
        rows = held_table.take(conn, keys)
        freed = 0
        for moved, (key, topic, payload, qos, retain, order) in enumerate(rows):
            if depth + moved >= self.max_entries and not freed:
                freed = self._make_room(conn, None)
            seq = self._append(conn, topic, payload, qos, bool(retain), key, now, order)
            added.append(OutboxEntry(seq, topic, bytes(payload), qos, bool(retain)))
        return len(rows), freed

    def _make_room(self, conn: sqlite3.Connection, compact_key: str | None) -> int:
        """Compact superseded state (or the one the new entry of ``compact_key``
        supersedes); returns how many entries were dropped."""
        freed = self._compaction.make_room(conn, compact_key)
        if freed:
            self.compacted += freed
            log.warning("outbox at its bound: compacted %d superseded entries", freed)
        return freed

    def _resolve(self, commit: _Commit) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._committed, commit)

    def _committed(self, commit: _Commit) -> None:
        """Event loop: extend (or drop) the tail first, then wake the waiting puts."""
        if commit.removed:
            self._unwritten.difference_update(commit.removed)
        if commit.added:
            self._commits_seen += 1
        if commit.reordered:
            self._tail.reset()
        elif commit.added:
            self._tail.extend(commit.added)
        for fut, result in commit.results:
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        if self.depth == 0:
            self._empty.set()
        else:
            self._empty.clear()
        self._changed.set()


#: Entries one INSERT appends (8 parameters each) or one DELETE removes at most, far
#: under SQLite's limit on parameters.
_ROWS_A_STATEMENT = 500


@functools.cache
def _append_sql(n: int) -> str:
    return ("INSERT INTO outbox (seq, topic, payload, qos, retain, compact_key, created_at,"
            " ord) VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n))


@functools.cache
def _delete_sql(n: int) -> str:
    return f"DELETE FROM outbox WHERE seq IN ({','.join('?' * n)})"


def _plain_puts(ops: list[Any], start: int) -> list[_Put]:
    """The puts from ``ops[start]`` on that are not held, up to the first other op."""
    run: list[_Put] = []
    for op in ops[start:]:
        if type(op) is not _Put or op.hold:
            break
        run.append(op)
    return run


#: SQLite primary result codes of a disk that is full, failing or busy: a write that
#: failed with one of these may succeed later unchanged.
_DISK_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY,
                         sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_NOMEM})


def _disk_error(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in _DISK_CODES


def _reason(exc: sqlite3.Error) -> str:
    """What an operator should read: ``disk full`` rather than an SQLite error code."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return f"disk full: {exc}"
    if code == sqlite3.SQLITE_IOERR:
        return f"disk I/O error: {exc}"
    return str(exc)
