"""The batch writer: acks only after commit, retries outages, isolates refused data."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Sequence

import pytest

from bridge.envelope import Envelope
from bridge.errors import StoreError, StoreRejectedError
from callback_server.batcher import (
    OVERLAP_MIN,
    BatchWriter,
    Outcome,
    PendingFullError,
    Reason,
    Settled,
)
from callback_server.store import BatchResult, Item


class FlakyStore:
    """Refuses envelopes whose id starts with 'bad'; fails while ``down`` is set."""

    def __init__(self) -> None:
        self.down = False
        self.written: list[str] = []
        self.dead: list[tuple[str, str]] = []
        self.calls = 0
        self.failed_thrice = asyncio.Event()

    async def write_batch(self, batch: Sequence[Item]) -> BatchResult:
        items = [i if isinstance(i, tuple) else ('', i) for i in batch]
        self.calls += 1
        if self.calls >= 3:
            self.failed_thrice.set()
        if self.down:
            raise StoreError("cannot reach the database")
        if any(env.id.startswith("bad") for _, env in items):
            raise StoreRejectedError("refused: Data too long for column")
        self.written += [env.id for _, env in items]
        return BatchResult(messages=len(items), logged=len(items), events=0, robots=0)

    async def dead_letters(self, letters: Sequence[tuple[str, bytes, str]]) -> None:
        if self.down:
            raise StoreError("cannot reach the database")
        self.dead += [(topic, reason) for topic, _, reason in letters]


def env(i: str, device: str = "d") -> Envelope:
    return Envelope(id=i, type="t", org="o", device=device, gateway="g", ts=1.0,
                    received_at=1.0)


@contextlib.asynccontextmanager
async def running(w: BatchWriter) -> AsyncIterator[BatchWriter]:
    """``w`` writing batches until the block ends."""
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def writer() -> AsyncIterator[tuple[BatchWriter, FlakyStore]]:
    store = FlakyStore()
    w = BatchWriter(store, batch_max=100, retry_min=0.001, retry_max=0.01)
    async with running(w):
        yield w, store


async def test_one_refused_message_is_dead_lettered_and_the_rest_stored(
    writer: tuple[BatchWriter, FlakyStore]
) -> None:
    w, store = writer
    ids = [f"m{i}" for i in range(20)] + ["bad-1"] + [f"n{i}" for i in range(20)]
    await w.write([("org/o/device/d/status", env(i)) for i in ids])
    assert sorted(store.written) == sorted(i for i in ids if not i.startswith("bad"))
    assert len(store.dead) == 1 and "refused" in store.dead[0][1]
    assert w.dead_lettered == 1 and not w.degraded


async def test_outage_holds_acks_until_the_commit(writer: tuple[BatchWriter, FlakyStore]) -> None:
    w, store = writer
    store.down = True
    acked: list[str] = []
    all_acked = asyncio.Event()

    def ack(name: str, settled: Settled) -> None:
        acked.append(name)
        if len(acked) == 5:
            all_acked.set()

    for i in range(5):
        w.submit("t", env(f"x{i}"), functools.partial(ack, f"x{i}"))
    await asyncio.wait_for(store.failed_thrice.wait(), 5)  # failing, backing off
    assert acked == [] and w.degraded and w.pending == 5
    store.down = False
    await asyncio.wait_for(all_acked.wait(), 5)
    assert acked == [f"x{i}" for i in range(5)] and not w.degraded


class LedgerStore(FlakyStore):
    """Remembers what it stored, and names the ids it already had."""

    async def write_batch(self, batch: Sequence[Item]) -> BatchResult:
        ids = [(i[1] if isinstance(i, tuple) else i).id for i in batch]
        before = set(self.written)
        await super().write_batch(batch)
        seen = frozenset(i for i in ids if i in before)
        return BatchResult(messages=len(ids), logged=len(ids) - len(seen), events=0,
                           robots=0, duplicate_ids=seen)


async def test_each_message_is_told_its_own_outcome() -> None:
    store = LedgerStore()
    w = BatchWriter(store, retry_min=0.001, retry_max=0.01)
    async with running(w):
        first = await w.write([("t", env("a")), ("t", env("b"))])
        assert [s.outcome for s in first] == [Outcome.STORED, Outcome.STORED]
        again = await w.write([("t", env("b")), ("t", env("bad-1")), ("t", env("c")),
                               ("t", env("c"))])
        assert [s.outcome for s in again] == [Outcome.DUPLICATE, Outcome.DEAD_LETTERED,
                                              Outcome.STORED, Outcome.DUPLICATE]
        assert again[1].reason is not None and again[1].reason.startswith(
            "refused by the database: ")
        assert (w.stored, w.duplicates, w.dead_lettered) == (3, 1, 1)
        assert w.counts.by_reason == {Reason.REFUSED: 1}


async def test_a_retry_of_a_pending_message_joins_it_and_the_cap_holds(
    writer: tuple[BatchWriter, FlakyStore]
) -> None:
    w, store = writer
    w.pending_max = 5
    store.down = True
    items = [("t", env(f"p{i}")) for i in range(3)]
    for _ in range(20):  # the sender's retries while the database is away
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(w.write(items), 0.01)
    assert w.held == 3 and w.pending == 3 and w.joined == 57
    more = [("t", env(f"q{i}")) for i in range(3)]
    with pytest.raises(PendingFullError):
        await w.write(more)  # 3 + 3 > 5: refused at once, nothing queued
    assert w.held == 3 and w.refused_full == 1
    dead = [("t", b"junk", "malformed: not JSON")]
    with pytest.raises(TimeoutError):  # dead letters are held by digest too
        await asyncio.wait_for(w.settle((), dead * 2), 0.01)
    assert w.held == 4
    store.down = False
    stored, kept = await w.settle(items, dead)  # joins what is still held: no second copy
    assert [s.outcome for s in stored] == [Outcome.STORED] * 3
    assert kept == [Settled(Outcome.DEAD_LETTERED, "malformed: not JSON")]
    assert store.written == ["p0", "p1", "p2"] and len(store.dead) == 1 and w.held == 0


class GatedStore:
    """Each batch's commit waits for its own gate: the test decides the commit order."""

    def __init__(self) -> None:
        self.gates: list[asyncio.Event] = []
        self.started = asyncio.Event()
        self.one_left = asyncio.Event()  # all but one batch committed
        self.in_flight = 0
        self.most_in_flight = 0
        self.batches: list[list[str]] = []  # each batch's envelope ids, as started

    async def write_batch(self, batch: Sequence[Item]) -> BatchResult:
        gate = asyncio.Event()
        self.gates.append(gate)
        self.batches.append([(i if isinstance(i, Envelope) else i[1]).id for i in batch])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.started.set()
        await gate.wait()
        self.in_flight -= 1
        if self.in_flight == 1:
            self.one_left.set()
        return BatchResult(messages=len(batch), logged=len(batch), events=0, robots=0)

    async def dead_letters(self, letters: Sequence[tuple[str, bytes, str]]) -> None:
        pass

    async def batches_started(self, n: int) -> None:
        """Wait until ``n`` batches have reached the database (committed or not)."""
        while len(self.gates) < n:
            await asyncio.wait_for(self.started.wait(), 5)
            self.started.clear()


async def test_batches_overlap_yet_are_settled_in_the_order_they_arrived() -> None:
    """While one batch waits for the database the next ones are written too, but a later
    batch committed first is acknowledged only after the earlier ones (MQTT wants
    acknowledgements in the order the messages came)."""
    store = GatedStore()
    w = BatchWriter(store, batch_max=2)
    settled: list[str] = []
    robots = ["r0", "r1", "r2"]
    for i in range(6):  # three robots' batches of two
        w.submit("org/o/device/d/status", env(f"m{i}", device=robots[i // 2]),
                 functools.partial(lambda name, _: settled.append(name), f"m{i}"))
    async with running(w):
        await store.batches_started(3)  # all three batches in the database at once
        assert store.most_in_flight == 3 and w.pending == 6
        store.gates[2].set()  # the last batch commits first...
        store.gates[1].set()
        await asyncio.wait_for(store.one_left.wait(), 5)
        assert settled == []  # ...and waits for the first
        store.gates[0].set()
        await asyncio.wait_for(w.drain(5), 6)
        assert settled == [f"m{i}" for i in range(6)] and w.pending == 0


async def test_a_robots_batches_are_written_one_at_a_time_in_order() -> None:
    """Batches in flight share no robot: the next batch of a robot waits for the one
    before it to commit (it would wait for that one's row locks in the database), while
    another robot's batch is written beside it."""
    store = GatedStore()
    w = BatchWriter(store, batch_max=2)
    settled: list[str] = []
    mine, other = "r0", "r1"
    names = [("a0", mine), ("a1", mine), ("b0", other), ("b1", other), ("a2", mine),
             ("a3", mine)]
    for name, robot in names:
        w.submit("t", env(name, device=robot),
                 functools.partial(lambda n, _: settled.append(n), name))
    async with running(w):
        await store.batches_started(2)
        assert store.most_in_flight == 2  # a0+a1 beside b0+b1, not a2+a3
        store.gates[1].set()  # b0+b1 commit, but wait for a0 and a1 to be acknowledged
        await asyncio.wait_for(store.one_left.wait(), 5)
        assert settled == [] and len(store.gates) == 2
        store.gates[0].set()  # a0+a1 commit: then a2+a3 is written
        await store.batches_started(3)
        assert settled == ["a0", "a1", "b0", "b1"] and store.most_in_flight == 2
        store.gates[2].set()
        await asyncio.wait_for(w.drain(5), 6)
        assert settled == ["a0", "a1", "b0", "b1", "a2", "a3"] and w.pending == 0


@pytest.mark.parametrize("robots", [300, 3 * OVERLAP_MIN])
async def test_what_queues_during_a_batch_goes_as_one_batch_unless_it_is_a_backlog(
        robots: int) -> None:
    """What an MQTT stream queues while a batch is in the database is written as one
    batch after its commit: split into batches written side by side, a few hundred
    robots made one full batch and slivers of a few robots each (a transaction's cost
    is mostly per statement). A backlog (``OVERLAP_MIN`` messages) is still split into
    thirds written at once, as a drain after an outage needs."""
    store = GatedStore()
    w = BatchWriter(store)
    async with running(w):
        w.submit("t", env("first", device="r"), lambda _: None)
        await store.batches_started(1)
        for i in range(robots):
            w.submit("t", env(f"m{i}", device=f"r{i}"), lambda _: None)
        store.gates[0].set()
        await store.batches_started(2)
        if robots < OVERLAP_MIN:
            assert [len(b) for b in store.batches] == [1, robots] and store.in_flight == 1
        else:
            await store.batches_started(4)
            assert [len(b) for b in store.batches] == [1] + [robots // 3] * 3
            assert store.in_flight == 3
        for gate in store.gates[1:]:
            gate.set()
        await asyncio.wait_for(w.drain(5), 6)
        assert w.pending == 0


async def test_an_http_push_starts_a_batch_at_once_an_mqtt_message_waits_for_a_commit() -> None:
    """With a batch in the database and a slot free, an MQTT message waits for that
    commit (what comes meanwhile joins the next, bigger batch), but an HTTP push, whose
    sender waits for the answer, starts the next batch at once; answers keep the order
    of arrival."""
    store = GatedStore()
    w = BatchWriter(store, batch_max=10)
    settled: list[str] = []
    async with running(w):
        w.submit("t", env("m0", device="r0"), lambda _: settled.append("m0"))
        await store.batches_started(1)
        w.submit("t", env("m1", device="r1"), lambda _: settled.append("m1"))
        w.submit("t", env("m2", device="r1"), lambda _: settled.append("m2"))
        assert store.batches == [["m0"]]  # the MQTT messages wait for m0's commit
        pushed = asyncio.create_task(w.write([("t", env("h0", device="r2"))]))
        await store.batches_started(2)  # m0 still in the database
        assert store.batches == [["m0"], ["m1", "m2", "h0"]] and store.in_flight == 2
        store.gates[1].set()
        await asyncio.wait_for(store.one_left.wait(), 5)
        assert settled == [] and not pushed.done()  # committed, answered after m0
        store.gates[0].set()
        assert [s.outcome for s in await asyncio.wait_for(pushed, 5)] == [Outcome.STORED]
        assert settled == ["m0", "m1", "m2"] and w.pending == 0


async def test_a_dead_letter_is_written_between_batches_not_once_the_stream_pauses() -> None:
    """Under a steady stream the writer never goes idle: a dead letter is written and
    answered after the batch in flight commits, before the next batch, not once the
    messages stop coming."""
    store = GatedStore()
    w = BatchWriter(store, batch_max=10)
    settled: list[str] = []
    async with running(w):
        w.submit("t", env("m0", device="r0"), lambda _: settled.append("m0"))
        await store.batches_started(1)
        w.submit_dead("t", b"{", "malformed: not JSON", lambda _: settled.append("dead"))
        w.submit("t", env("m1", device="r0"), lambda _: settled.append("m1"))
        store.gates[0].set()
        await store.batches_started(2)  # m1's batch, m1 not yet committed
        assert settled == ["m0", "dead"] and store.batches == [["m0"], ["m1"]]
        store.gates[1].set()
        await asyncio.wait_for(w.drain(5), 6)
        assert settled == ["m0", "dead", "m1"]
