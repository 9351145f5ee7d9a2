"""Keyset pages: 2,500 robots each exactly once while they are updated, events in order."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.envelope import Envelope
from bridge.http.paging import MaybeNumber, MaybeText, Text, decode_cursor, encode_cursor
from callback_server.store import SqlStore, open_store
from tests.support.dbutil import scratch_mysql_database

FLEET = 2500


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    def urls() -> Iterator[str]:
        if request.param == "sqlite":
            yield f"sqlite:///{tmp_path / 'store.db'}"
        else:
            with scratch_mysql_database() as url:
                yield url

    for url in urls():
        async with open_store(url) as s:
            await s.migrate()
            yield s


def status(sn: str, org: str, ts: float, state: str) -> tuple[str, Envelope]:
    e = Envelope(id=uuid.uuid4().hex, type="notifyRobotStatus", org=org, device=sn,
                 gateway=f"gw-{org}", ts=ts, received_at=ts, data={"status": state},
                 raw={}, channel="status")
    return f"org/{org}/device/{sn}/status", e


def event(sn: str, i: int, ts: float) -> tuple[str, Envelope]:
    data: dict[str, Any] = {"event_id": f"e{i:04d}", "event_level": "high",
                            "event_type": "Bump"}
    e = Envelope(id=f"ev{i}-{sn}", type="robotErrorWarning", org="acme", device=sn,
                 gateway="gw", ts=ts, received_at=ts, data=data, raw=dict(data),
                 channel="event")
    return f"org/acme/device/{sn}/event", e


@pytest.mark.parametrize("limit", [100, 333, 1000])
async def test_paging_2500_robots_returns_each_once_while_they_are_updated(
        store: SqlStore, limit: int) -> None:
    rng = random.Random(limit)
    fleet = [f"R{rng.randrange(10**8):08d}-{i}" for i in range(FLEET)]
    orgs = {sn: ("acme", "beta")[i % 2] for i, sn in enumerate(fleet)}
    for start in range(0, FLEET, 500):
        await store.write_batch([status(sn, orgs[sn], 1e9, "idle")
                                 for sn in fleet[start:start + 500]])
    seen: list[str] = []
    after: Any = None
    pages = 0
    ts = 1e9
    while True:
        items, last = await store.list_robots(limit=limit, after=after)
        seen += [r["robot_sn"] for r in items]
        pages += 1
        # Between pages the fleet keeps reporting: robots already read and not yet read.
        ts += 1
        await store.write_batch([status(sn, orgs[sn], ts, rng.choice(("busy", "idle")))
                                 for sn in rng.sample(fleet, 200)])
        if last is None:
            break
        after = decode_cursor(encode_cursor(last), Text, Text)  # (sn, org)
    assert sorted(seen) == sorted(fleet) and len(seen) == len(set(seen))
    assert pages == -(-FLEET // limit)
    # Limited to some orgs, and filtered: still each once.
    acme: list[str] = []
    after = None
    while True:
        items, last = await store.list_robots(limit=limit, after=after, orgs={"acme"})
        acme += [r["robot_sn"] for r in items]
        assert all(r["org_id"] == "acme" for r in items)
        if last is None:
            break
        after = last[0]
    assert sorted(acme) == sorted(sn for sn in fleet if orgs[sn] == "acme")
    busy, _ = await store.list_robots(limit=1000, status="busy", gateway="gw-beta")
    assert busy and all(r["status"] == "busy" and r["gateway_id"] == "gw-beta" for r in busy)


async def test_event_pages_follow_the_newest_first_order(store: SqlStore) -> None:
    # Ties on robot time are broken by event_id, so every page boundary is exact.
    await store.write_batch([event("E1", i, 1_700_000_000 + i // 3) for i in range(250)])
    expected = [e["event_id"] for e in await store.get_events("E1", 1000)]
    got: list[str] = []
    after = None
    while True:
        items, last = await store.list_events("E1", limit=7, after=after)
        got += [e["event_id"] for e in items]
        if last is None:
            break
        after = decode_cursor(encode_cursor(last), MaybeText, MaybeNumber, Text)
    assert got == expected and len(got) == 250


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("limit", [1, 4, 7])
def test_a_three_column_keyset_pages_through_ties_once_each_in_order(
        descending: bool, limit: int) -> None:
    """Where.after's keyset over (a, b, c) with many ties on a and b, on SQLite: every row
    comes once, in the ORDER BY's order, and the last page says there is no next one."""
    import sqlite3

    from bridge.http.paging import Page
    from callback_server.store.dialect import Dialect
    from callback_server.store.query import Where

    db = sqlite3.connect(":memory:")
    db.row_factory = sqlite3.Row
    db.execute("CREATE TABLE t (a INTEGER, b TEXT, c INTEGER)")
    rows = [(a, b, c) for a in range(3) for b in ("x", "y") for c in range(4)]
    random.Random(7).shuffle(rows)
    db.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    way = " DESC" if descending else ""
    order = f"a{way}, b{way}, c{way}"
    seen: list[tuple[Any, ...]] = []
    after: list[Any] | None = None
    for _ in range(len(rows) + 2):
        q = Where(Dialect("sqlite")).after(after, "a", "b", "c", descending=descending)
        fetched = db.execute(f"SELECT a, b, c FROM t{q.sql()}{q.page(order, limit)}",
                             q.args).fetchall()
        page = Page.of(fetched, limit, lambda r: [r["a"], r["b"], r["c"]])
        seen += [tuple(r) for r in page.items]
        body = page.map(tuple).body()
        assert len(body["items"]) <= limit
        if page.after is None:
            assert body["next_cursor"] is None
            break
        assert decode_cursor(body["next_cursor"], (int,), Text, (int,)) == page.after
        after = page.after
    assert seen == sorted(rows, reverse=descending)
