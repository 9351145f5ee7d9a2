"""The batch writer: acks only after commit, retries outages, isolates refused data."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Sequence

import pytest

from bridge.envelope import Envelope
from bridge.errors import StoreError, StoreRejectedError
from callback_server.batcher import BatchWriter, Settled
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
        self.dead += [(topic, reason) for topic, _, reason in letters]


def env(i: str) -> Envelope:
    return Envelope(id=i, type="t", org="o", device="d", gateway="g", ts=1.0, received_at=1.0)


@pytest.fixture
async def writer() -> AsyncIterator[tuple[BatchWriter, FlakyStore]]:
    store = FlakyStore()
    w = BatchWriter(store, batch_max=100, retry_min=0.001, retry_max=0.01)
    task = asyncio.create_task(w.run())
    yield w, store
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
