"""The durable outbox: commit before answer, dedup, bound policy, restart."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import tempfile
import threading
import unittest.mock
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import OutboxFullError, OutboxUnwritableError
from bridge.outbox import SCHEMA, Outbox, PutResult, body_key, compaction, dedup
from bridge.outbox import numbers as numbers_module
from tests.support.waiting import eventually_async


async def test_put_peek_remove_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path) as box:
        for i in range(5):
            assert await box.put(f"t/{i}", b"%d" % i) is PutResult.ACCEPTED
        entries = await box.peek(0)
        assert [e.topic for e in entries] == [f"t/{i}" for i in range(5)]
        box.remove([entries[0].seq, entries[1].seq])
        await box.put("t/5", b"5")  # orders after the removal in the writer queue
        assert box.depth == 4
    async with Outbox(path) as box:
        assert box.depth == 4
        entries = await box.peek(0)
        assert [e.payload for e in entries] == [b"2", b"3", b"4", b"5"]
        assert entries == sorted(entries, key=lambda e: e.seq)


async def test_a_waiting_removal_is_never_read_back_and_is_written_by_close(
        tmp_path: Path) -> None:
    """A removal waits for the next write (remove_delay); meanwhile no read hands its
    entry out again, and a close writes it."""
    path = tmp_path / "o.db"
    async with Outbox(path, remove_delay=3600) as box:
        for i in range(3):
            await box.put(f"t/{i}", b"%d" % i)
        first, second, _ = await box.peek(0)
        box.remove([first.seq])
        assert box.depth == 3  # waiting for a write to ride with
        # From the start again (a resend): older than the tail, so read from SQLite.
        assert [e.payload for e in await box.peek(0)] == [b"1", b"2"]
        assert [e.payload for e, _ in await box.drain_plan(2)] == [b"1", b"2"]
        box.remove([second.seq])
        assert [e.payload for e in await box.peek(0, limit=1)] == [b"2"]
        await box.put("t/3", b"3")  # the removals ride with it
        assert box.depth == 2
    async with Outbox(path) as box:
        assert [e.payload for e in await box.peek(0)] == [b"2", b"3"]
        box.remove([(await box.peek(0))[0].seq])
    async with Outbox(path) as box:  # the close wrote that one
        assert [e.payload for e in await box.peek(0)] == [b"3"]


async def test_concurrent_puts_share_commits(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        results = await asyncio.gather(*(box.put("t", b"%d" % i) for i in range(500)))
        assert all(r is PutResult.ACCEPTED for r in results)
        assert box.depth == 500
        # group commit: far fewer commits than puts
        assert box.commits < 100, box.commits


async def test_duplicate_keys_are_reported_not_stored(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        assert await box.put("t", b"a", dedup_keys=["trace:1"]) is PutResult.ACCEPTED
        assert await box.put("t", b"a", dedup_keys=["trace:1"]) is PutResult.DUPLICATE
        # either key matching is enough (same body under a new TraceId)
        assert await box.put("t", b"a", dedup_keys=["trace:2", "body:x"]) is PutResult.ACCEPTED
        assert await box.put("t", b"a", dedup_keys=["trace:3", "body:x"]) is PutResult.DUPLICATE
        same_batch = await asyncio.gather(
            box.put("t", b"b", dedup_keys=["k"]), box.put("t", b"b", dedup_keys=["k"])
        )
        assert sorted(r.value for r in same_batch) == ["accepted", "duplicate"]
        assert box.depth == 3


@given(st.binary(max_size=64), st.binary(max_size=64),
       st.one_of(st.none(), st.floats(min_value=0, max_value=1e11)),
       st.one_of(st.none(), st.floats(min_value=0, max_value=1e11)))
def test_body_keys_tell_bodies_apart_and_sort_by_robot_time(
        a: bytes, b: bytes, ts_a: float | None, ts_b: float | None) -> None:
    assert body_key(a, ts_a) == body_key(a, ts_a)  # a retry: the same key
    if a != b:
        assert body_key(a, ts_a) != body_key(b, ts_a)
    millis_a, millis_b = (round(t * 1000) if t else 0 for t in (ts_a, ts_b))
    if millis_a < millis_b:  # the seen table's B-tree takes them in about arrival order
        assert body_key(a, ts_a) < body_key(b, ts_b)


@given(st.binary(max_size=64), st.one_of(st.none(), st.floats(), st.integers(-2**70, 2**70)))
def test_a_body_key_is_made_for_any_robot_time(raw: bytes, ts: float | None) -> None:
    """A time the normaliser would never pass on (NaN, infinite, past 8 bytes of
    milliseconds) still makes a key, the same each time: that of no time."""
    key = body_key(raw, ts)
    assert len(key) == 24 and key == body_key(raw, ts)
    if ts is None or not 0 < ts < 2**63 / 1000:
        assert key == body_key(raw, None)


async def test_body_keys_and_text_keys_dedup_side_by_side(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    key = body_key(b'{"sn": "A"}', 1_700_000_000.5)
    async with Outbox(path) as box:
        assert await box.put("t", b"a", dedup_keys=[key]) is PutResult.ACCEPTED
        assert await box.put("t", b"p", dedup_keys=["poll:1"]) is PutResult.ACCEPTED
        box.remove([e.seq for e in await box.peek(0)])
    async with Outbox(path) as box:
        assert await box.put("t", b"a", dedup_keys=[key]) is PutResult.DUPLICATE
        assert await box.put("t", b"p", dedup_keys=["poll:1"]) is PutResult.DUPLICATE
        later = body_key(b'{"sn": "A"}', 1_700_000_001.5)  # another time: another body
        assert await box.put("t", b"a", dedup_keys=[later]) is PutResult.ACCEPTED


TTL = 600.0  # seconds; the prunes below run every PRUNE_EVERY, as the writer's do
PRUNE_EVERY = 60.0


@given(st.lists(st.tuples(
    st.sampled_from(["body", "no time", "text"]),
    st.floats(min_value=-3 * TTL, max_value=3 * TTL),  # robot clock ahead (+) or behind
    st.floats(min_value=0, max_value=5 * TTL)), min_size=1, max_size=20))
def test_a_retry_key_is_kept_its_ttl_and_forgotten_within_twice_it(
        keys: list[tuple[str, float, float]]) -> None:
    """Any robot clock, ahead or behind, or none: a key is a duplicate for the TTL after
    it was marked, and the table forgets it within twice the TTL and a minute (pruned
    by ranges of keys, not by an index on the time marked)."""
    start = 1_700_000_000.0
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA)
    marked: dict[dedup.Key, float] = {}
    for i, (kind, ahead, after) in enumerate(keys):
        at = start + after
        key: dedup.Key = (f"poll:{i}" if kind == "text" else
                          body_key(str(i).encode(), None if kind == "no time" else at + ahead))
        marked[key] = at
    now, waiting = start, dict(marked)
    while now < start + 8 * TTL:
        for key, at in list(waiting.items()):
            if at <= now:  # marked since the last prune
                dedup.mark(conn, [key], at)
                del waiting[key]
        dedup.prune(conn, now - TTL, now)
        seen = dedup.seen_of(conn, marked)
        for key, at in marked.items():
            if at <= now < at + TTL:
                assert key in seen, "forgotten within its TTL"
            if now >= at + 2 * TTL + dedup.AHEAD_SECONDS + PRUNE_EVERY:
                assert key not in seen, "kept past twice its TTL"
        now += PRUNE_EVERY


def test_an_older_files_indexes_on_retry_and_compact_keys_are_dropped(tmp_path: Path) -> None:
    """A file made when ``seen`` had an index on ``at`` and the outbox one on
    ``compact_key`` loses both (a page each commit)."""
    path = tmp_path / "o.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA + "CREATE INDEX seen_at ON seen (at);"
                           "CREATE INDEX outbox_compact ON outbox (compact_key, seq)"
                           " WHERE compact_key IS NOT NULL;")
    asyncio.run(_open_and_close(path))
    with sqlite3.connect(path) as conn:
        names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
    assert not names & {"seen_at", "outbox_compact"} and {"seen", "outbox"} <= names


async def _open_and_close(path: Path) -> None:
    async with Outbox(path):
        pass


async def test_dedup_survives_publish_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path) as box:
        await box.put("t", b"a", dedup_keys=["trace:1"])
        box.remove([e.seq for e in await box.peek(0)])
    async with Outbox(path) as box:
        assert await box.put("t", b"a", dedup_keys=["trace:1"]) is PutResult.DUPLICATE
        assert box.depth == 0


async def test_full_outbox_compacts_superseded_state_then_refuses_events(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", max_entries=4) as box:
        await box.put("pose", b"p1", compact_key="pose:A")
        await box.put("pose", b"p2", compact_key="pose:A")
        await box.put("evt", b"e1")
        await box.put("evt", b"e2")
        # full: the older pose of robot A is compacted away to take e3
        assert await box.put("evt", b"e3") is PutResult.ACCEPTED
        payloads = [e.payload for e in await box.peek(0)]
        assert payloads == [b"p2", b"e1", b"e2", b"e3"]
        assert box.compacted == 1
        # nothing superseded left: an event is refused, never dropped silently
        with pytest.raises(OutboxFullError):
            await box.put("evt", b"e4")
        # a newer pose of A supersedes the stored one
        assert await box.put("pose", b"p3", compact_key="pose:A") is PutResult.ACCEPTED
        payloads = [e.payload for e in await box.peek(0)]
        assert payloads == [b"e1", b"e2", b"e3", b"p3"]
        assert box.depth == 4

#: An operation on a small outbox: a put (with a compact key or none), the publisher's
#: acknowledgement of the oldest entry, or a restart.
_OPS = st.lists(st.sampled_from([
    *(("put", key) for key in (None, None, "pose:A", "pose:A", "pose:B", "power:A")),
    ("ack", None), ("ack", None), ("restart", None)]), min_size=1, max_size=40)


@pytest.mark.parametrize("max_keys", [compaction.MAX_KEYS, 1])
@settings(max_examples=200, deadline=None)
@given(ops=_OPS)
def test_the_bound_compacts_what_an_index_on_the_key_would(
        max_keys: int, ops: list[tuple[str, Any]]) -> None:
    """At the bound the superseded entries go (each key's newest stays), else the newest
    one of the new entry's key, else the put is refused: the same entries, in the same
    order, as the statements over an index on ``compact_key`` left, through acks and
    restarts (what the writer remembers starts again from a scan), and with more keys
    than it remembers (scans alone)."""
    bound = 4

    def model_put(model: list[tuple[str | None, bytes]], key: str | None,
                  payload: bytes) -> bool:
        if len(model) >= bound:
            newest = {k: i for i, (k, _) in enumerate(model) if k is not None}
            kept = [e for i, e in enumerate(model) if e[0] is None or newest[e[0]] == i]
            if len(kept) == len(model) and key is not None:
                kept = [e for e in model if e[0] != key]
            if len(kept) == len(model):
                return False
            model[:] = kept
        model.append((key, payload))
        return True

    async def run(path: Path) -> None:
        model: list[tuple[str | None, bytes]] = []
        box = await Outbox(path, max_entries=bound).__aenter__()
        try:
            for n, (op, key) in enumerate(ops):
                if op == "put":
                    payload = b"%d" % n
                    expected = model_put(model, key, payload)
                    try:
                        await box.put("t", payload, compact_key=key)
                        stored = True
                    except OutboxFullError:
                        stored = False
                    assert stored == expected
                elif op == "ack" and model:
                    box.remove([(await box.peek(0, 1))[0].seq])
                    await box.sync()
                    del model[0]
                elif op == "restart":
                    await box.__aexit__(None, None, None)
                    box = await Outbox(path, max_entries=bound).__aenter__()
                assert [e.payload for e in await box.peek(0)] == [p for _, p in model]
        finally:
            await box.__aexit__(None, None, None)

    with tempfile.TemporaryDirectory() as tmp, \
            unittest.mock.patch.object(compaction, "MAX_KEYS", max_keys):
        asyncio.run(run(Path(tmp) / "o.db"))


def _fail_next_mark(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Arms a disk-full failure of the next transaction that marks retry keys (after
    its entries were written in it); returns the arming."""
    mark = dedup.mark
    armed = [False]

    def mark_failing(conn: sqlite3.Connection, keys: Any, now: float) -> None:
        if keys and armed[0]:
            armed[0] = False
            raise sqlite3.OperationalError("database or disk is full")
        mark(conn, keys, now)

    monkeypatch.setattr(dedup, "mark", mark_failing)
    return lambda: armed.__setitem__(0, True)


async def test_a_write_that_failed_at_the_bound_leaves_nothing_wrongly_remembered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A put at the bound that superseded a pose and then failed (the disk filling up)
    is rolled back with what it superseded: the next pose of the robot still supersedes
    the stored one, instead of being refused for the one never committed."""
    fail = _fail_next_mark(monkeypatch)
    async with Outbox(tmp_path / "o.db", max_entries=3, retry_seconds=0.05) as box:
        await box.put("pose", b"a1", compact_key="pose:A")
        await box.put("evt", b"e1")
        await box.put("evt", b"e2")
        await box.put("pose", b"a2", compact_key="pose:A")  # supersedes a1 at the bound
        fail()
        with pytest.raises(OutboxUnwritableError):
            await box.put("pose", b"a3", compact_key="pose:A", dedup_keys=["k3"])
        await eventually_async(lambda: box.unwritable is None, within=5)
        assert await box.put("pose", b"a4", compact_key="pose:A") is PutResult.ACCEPTED
        assert [e.payload for e in await box.peek(0)] == [b"e1", b"e2", b"a4"]


async def test_rejected_entries_are_kept_bounded_and_requeued_in_order(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path, max_rejected=2) as box:
        for i in range(4):
            await box.put(f"t/{i}", b"%d" % i)
        entries = await box.peek(0)
        for entry in entries[:3]:
            box.reject(entry.seq, "Not authorized (0x87)")
        await box.put("t/4", b"4")  # orders after the rejections in the writer queue
        assert (box.depth, box.rejected) == (2, 2)  # the oldest rejected one was dropped
    async with Outbox(path) as box:
        assert (box.depth, box.rejected) == (2, 2)
        assert await box.requeue_rejected() == 2
        assert (box.depth, box.rejected) == (4, 0)
        assert [e.payload for e in await box.peek(0)] == [b"3", b"4", b"1", b"2"]


def _stored_mark(path: Path) -> int:
    """The high-water mark the file keeps for entry numbers (``sqlite_sequence``)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()[0])


async def test_entry_numbers_only_grow_and_their_mark_is_not_rewritten_each_commit(
        tmp_path: Path) -> None:
    """The writer numbers entries under a leased ceiling, so the mark's row (a page of
    its own) is not rewritten by every commit; numbers still never come back: not after
    the outbox empties and reopens, nor after requeued rejects, nor after a write that
    failed."""
    path = tmp_path / "o.db"
    numbers: list[int] = []

    async def put_one(box: Outbox, payload: bytes) -> int:
        await box.put("t", payload)
        seq = max(e.seq for e in await box.peek(0))
        numbers.append(seq)
        return seq

    async with Outbox(path) as box:
        await put_one(box, b"0")
        mark = _stored_mark(path)
        for i in range(1, 30):  # each put its own commit
            await put_one(box, b"%d" % i)
        assert _stored_mark(path) == mark > numbers[-1]
        box.remove(numbers)
    async with Outbox(path) as box:  # emptied and reopened: numbering resumes above
        assert await put_one(box, b"after restart") > mark
        box.reject(numbers[-1], "Not authorized (0x87)")
        assert await box.requeue_rejected() == 1
        requeued = max(e.seq for e in await box.peek(0))
        assert requeued > numbers[-1]
        numbers.append(requeued)
        await put_one(box, b"after requeue")
    assert numbers == sorted(set(numbers))


async def test_a_lease_rolled_back_with_a_failed_write_is_taken_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails after it leased numbers (the disk filling up) rolls the lease
    back with its entries: the next write stores one again, and nothing is numbered
    twice, then or after a restart."""
    monkeypatch.setattr(numbers_module, "LEASE", 2)  # a lease in nearly every write
    _fail_next_mark(monkeypatch)()
    path = tmp_path / "o.db"
    async with Outbox(path, retry_seconds=0.05) as box:
        for i in range(5):
            await box.put("t", b"%d" % i)
        with pytest.raises(OutboxUnwritableError):
            await box.put("t", b"refused", dedup_keys=["k"])  # leased, then rolled back
        await eventually_async(lambda: box.unwritable is None, within=5)
        for i in range(5, 10):
            await box.put("t", b"%d" % i, dedup_keys=[f"k{i}"])
        assert _stored_mark(path) >= max(e.seq for e in await box.peek(0))
    async with Outbox(path) as box:
        await box.put("t", b"after restart")
        entries = await box.peek(0)
    assert [e.payload for e in entries] == [b"%d" % i for i in range(10)] + [b"after restart"]
    seqs = [e.seq for e in entries]
    assert seqs == sorted(set(seqs))

async def _stored(box: Outbox, after: int) -> list[tuple[int, bytes]]:
    rows = await asyncio.to_thread(box._read, after, 5_000)
    return [(r[0], bytes(r[2])) for r in rows]


async def test_tail_in_memory_matches_what_sqlite_holds(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", max_entries=6) as box:
        for i in range(3):
            await box.put("t", b"a%d" % i, compact_key="pose:A")
        first = await box.peek(0)  # from SQLite; reached the end, so the tail starts here
        assert box._tail.start == first[-1].seq
        await asyncio.gather(*(box.put("t", b"b%d" % i) for i in range(3)))
        later = await box.peek(first[-1].seq)
        assert [(e.seq, e.payload) for e in later] == await _stored(box, first[-1].seq)
        assert len(later) == 3 and box._tail.start is not None
        box.remove([later[0].seq])  # acked: gone from the tail at once
        assert [e.seq for e in await box.peek(first[-1].seq)] == [e.seq for e in later[1:]]
        await box.put("t", b"x")
        assert box._tail.start is not None
        # full: compaction drops stored entries, so the tail is dropped too
        await box.put("t", b"c", compact_key="pose:A")
        assert box.compacted == 2 and box._tail.start is None
        entries = await box.peek(0)
        assert [(e.seq, e.payload) for e in entries] == await _stored(box, 0)
        assert [e.payload for e in entries] == [b"a2", b"b1", b"b2", b"x", b"c"]


async def test_a_burst_of_puts_is_stored_in_order_with_its_retries_refused(
        tmp_path: Path) -> None:
    """Puts queued together are written together (one INSERT for hundreds of entries):
    each gets the seq SQLite gave it, in the order they were put, whether read from
    memory or from the file; a retry is refused whether its first copy came before the
    burst or earlier in it; a held put in the middle stays held."""
    async with Outbox(tmp_path / "o.db") as box:
        await box.put("t", b"before", dedup_keys=["k:before"])
        start = (await box.peek(0))[-1].seq

        def key(i: int) -> str:
            return "k:before" if i == 3 else f"k:{i - 5 if i % 7 == 6 else i}"

        results = await asyncio.gather(
            *(box.put("t", b"%d" % i, dedup_keys=[key(i)], hold=i == 600,
                      compact_key="held" if i == 600 else None) for i in range(1_200)))
        retries = {i for i in range(1_200) if i == 3 or i % 7 == 6}
        assert [i for i, r in enumerate(results) if r is PutResult.DUPLICATE] == sorted(retries)
        assert results[600] is PutResult.HELD
        stored = [b"%d" % i for i in range(1_200) if i not in retries and i != 600]
        from_memory = await box.peek(start, limit=2_000)
        assert [e.payload for e in from_memory] == stored
        assert [(e.seq, e.payload) for e in from_memory] == await _stored(box, start)
        assert box.depth == len(stored) + 1 and box.held == 1
        box.remove([e.seq for e in from_memory] + [from_memory[0].seq])  # one twice
        await box.sync()
        assert box.depth == 1 and [e.payload for e in await box.peek(0)] == [b"before"]


async def test_tail_is_dropped_when_the_publisher_falls_far_behind(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        assert await box.peek(0) == []
        assert box._tail.start == 0
        await asyncio.gather(*(box.put("t", b"%d" % i) for i in range(5000)))
        assert box._tail.start is None
        entries = await box.peek(0, limit=10_000)
        assert [e.payload for e in entries] == [b"%d" % i for i in range(5000)]


async def test_a_second_process_cannot_open_the_same_outbox(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path):
        other = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", "import asyncio, sys\n"
             "from bridge.outbox import Outbox\n"
             "from bridge.errors import OutboxLockedError\n"
             "async def main():\n"
             "    try:\n"
             f"        async with Outbox({str(path)!r}): return 0\n"
             "    except OutboxLockedError as exc:\n"
             "        print(exc); return 3\n"
             "sys.exit(asyncio.run(main()))\n"],
            capture_output=True, text=True, timeout=30, check=False, cwd=Path(__file__).parents[1])
        assert other.returncode == 3 and "in use by another process" in other.stdout
    async with Outbox(path):  # released on close
        pass


async def test_held_entries_keep_the_newest_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path) as box:
        put = box.put
        assert await put("p/a", b"1", compact_key="pose:a", hold=True, order=1) is PutResult.HELD
        assert await put("p/a", b"3", compact_key="pose:a", hold=True,
                         order=3) is PutResult.REPLACED
        # Older robot time than what is held: superseded, not stored.
        assert await put("p/a", b"2", compact_key="pose:a", hold=True,
                         order=2) is PutResult.STALE
        assert await put("p/b", b"9", compact_key="pose:b", hold=True, order=9,
                         dedup_keys=["k"]) is PutResult.HELD
        assert await put("p/b", b"9", compact_key="pose:b", hold=True, order=9,
                         dedup_keys=["k"]) is PutResult.DUPLICATE
        assert (box.held, box.depth) == (2, 0)
        assert await box.peek(0) == []
        box.release(["pose:a"])
        await put("s/a", b"status")  # queued after the release: committed after it
        assert (box.held, box.depth) == (1, 2)
        assert [e.payload for e in await box.peek(0)] == [b"3", b"status"]
    # The agent died with pose:b held: it is still there, and released at start.
    async with Outbox(path) as box:
        assert box.held == 1
        assert await box.release_all() == 1
        assert (box.held, box.depth) == (0, 3)
        assert [e.payload for e in await box.peek(0)] == [b"3", b"status", b"9"]


class _SlowReader:
    """The outbox's reader, each statement held until the test lets it run."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.entered = threading.Event()
        self.go = threading.Event()
        self.done = threading.Event()
        self.failed: BaseException | None = None

    def execute(self, *args: Any) -> Any:
        self.entered.set()
        self.go.wait(10)
        try:
            return self.conn.execute(*args)
        except BaseException as exc:  # what closing it under the statement did
            self.failed = exc
            raise
        finally:
            self.done.set()

    def close(self) -> None:
        self.conn.close()


async def test_stopping_during_a_read_closes_the_reader_only_once_the_read_is_done(
        tmp_path: Path) -> None:
    """A read runs on in its thread when the task awaiting it is cancelled (the
    publisher, stopping); closing SQLite under it crashed the whole process (the test
    suite saw a segfault). The close waits for it."""
    box = Outbox(tmp_path / "o.db")
    await box.__aenter__()
    await box.put("t", b"x")
    reader = box._reader = _SlowReader(box._reader)  # type: ignore[assignment]
    box._tail.start = None  # the tail does not cover it: peek reads the database
    peek = asyncio.create_task(box.peek(-1))
    await asyncio.to_thread(reader.entered.wait, 10)
    peek.cancel()
    closing = asyncio.create_task(box.__aexit__(None, None, None))
    # One loop turn at a time until the writer has stopped: the reader's close comes
    # next, in the same turn (no event marks it).
    while box._thread is not None:  # noqa: ASYNC110
        await asyncio.sleep(0)
    reader.go.set()  # the statement runs (closing under it failed it)
    await asyncio.wait_for(closing, 10)
    await asyncio.to_thread(reader.done.wait, 10)
    assert reader.failed is None and box._reader is None
    with pytest.raises(asyncio.CancelledError):
        await peek
