"""Entries the broker refused for good, set aside in the ``rejected`` table.

One poison message must not hold up everything behind it; ``requeue`` puts them back at
the end once the cause is fixed. The table keeps the newest ``bound`` entries (a
warning for each drop). Writer-thread functions, inside the writer's transaction."""

from __future__ import annotations

import logging
import sqlite3

log = logging.getLogger(__name__)


def set_aside(conn: sqlite3.Connection, seq: int, reason: str, now: float,
              bound: int) -> bool:
    """Copy outbox entry ``seq`` here with why; False if it is not in the outbox (the
    caller deletes it from the outbox when True)."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO rejected (seq, topic, payload, qos, retain, reason, rejected_at)"
        " SELECT seq, topic, payload, qos, retain, ?, ? FROM outbox WHERE seq = ?",
        (reason, now, seq),
    )
    if cur.rowcount <= 0:
        return False
    excess = conn.execute(
        "DELETE FROM rejected WHERE seq NOT IN"
        " (SELECT seq FROM rejected ORDER BY seq DESC LIMIT ?)", (bound,)
    ).rowcount
    if excess > 0:
        log.warning("rejected table over its bound of %d: dropped the %d oldest",
                    bound, excess)
    return True


def requeue(conn: sqlite3.Connection, now: float) -> int:
    """Move every rejected entry back to the end of the outbox; how many moved."""
    moved = conn.execute(
        "INSERT INTO outbox (topic, payload, qos, retain, compact_key, created_at)"
        " SELECT topic, payload, qos, retain, NULL, ? FROM rejected ORDER BY seq", (now,)
    ).rowcount
    conn.execute("DELETE FROM rejected")
    return max(moved, 0)


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM rejected").fetchone()[0])
