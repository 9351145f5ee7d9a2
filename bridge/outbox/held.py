"""Messages held back by the edge's downsampler (the ``held`` table).

One row per ``compact_key`` (a robot's channel), the newest by ``order`` (robot time)
winning, until the interval ends and the caller moves it into the outbox. In SQLite,
not only in memory, so a callback answered 200 survives a crash during its interval.
Writer-thread functions, inside the writer's transaction."""

from __future__ import annotations

import sqlite3

from bridge.outbox.entries import PutResult

#: (compact_key, topic, payload, qos, retain) of a held row.
HeldRow = tuple[str, str, bytes, int, int, float]


def hold(conn: sqlite3.Connection, key: str, topic: str, payload: bytes, qos: int,
         retain: bool, order: float, now: float) -> PutResult:
    """Keep this message for ``key`` unless an older-by-robot-time one would replace a
    newer one: HELD (first), REPLACED (newer than the one held) or STALE."""
    before = conn.execute("SELECT ord FROM held WHERE compact_key = ?", (key,)).fetchone()
    if before is not None and before[0] > order:
        return PutResult.STALE
    conn.execute(
        "INSERT OR REPLACE INTO held (compact_key, topic, payload, qos, retain, ord,"
        " held_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (key, topic, payload, qos, int(retain), order, now))
    return PutResult.HELD if before is None else PutResult.REPLACED


def take(conn: sqlite3.Connection, keys: tuple[str, ...] | None) -> list[HeldRow]:
    """Remove and return the rows of ``keys`` (all of them, in the order held, if None)."""
    if keys is None:
        rows = conn.execute("SELECT compact_key, topic, payload, qos, retain, ord FROM held"
                            " ORDER BY held_at").fetchall()
    else:
        rows = [row for key in keys for row in conn.execute(
            "SELECT compact_key, topic, payload, qos, retain, ord FROM held"
            " WHERE compact_key = ?", (key,))]
    conn.executemany("DELETE FROM held WHERE compact_key = ?", [(r[0],) for r in rows])
    return rows


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM held").fetchone()[0])
