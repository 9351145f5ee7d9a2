"""Entry numbers (``seq``), handed out by the writer under a leased ceiling.

``seq INTEGER PRIMARY KEY AUTOINCREMENT`` never hands out a number twice: a rejected
entry keeps its number, and the publisher names entries by it. SQLite keeps that
promise by storing its high-water mark in ``sqlite_sequence`` and rewriting the row, a
page of its own, in every transaction that appends: one page in five of what a callback
at a trickle wrote. The writer numbers entries itself instead, under a ceiling it
stores there ``LEASE`` numbers ahead: SQLite rewrites the row only for a number past
the stored one, so once a lease. The promise holds across restarts (numbering resumes
above the stored ceiling, skipping what a lease left unused) and across a failed
transaction (its lease is read again); and should anything append without a number,
SQLite numbers it above the ceiling and raises the stored mark itself.

Writer-thread only, like every statement here.
"""

from __future__ import annotations

import sqlite3

#: Numbers leased at a time: a row rewrite every this many entries instead of each commit.
LEASE = 100_000


class Numbers:
    """The next entry numbers, and the ceiling stored for them in ``sqlite_sequence``."""

    def __init__(self) -> None:
        self._next = 0
        self._ceiling = -1  # nothing leased: read the stored mark before the next take

    def take(self, conn: sqlite3.Connection, n: int) -> int:
        """The first of ``n`` consecutive new numbers; in the caller's transaction, so a
        new lease is stored with the entries it numbers."""
        if self._next + n - 1 > self._ceiling:
            if self._ceiling < 0:
                self._next = _stored(conn) + 1
            self._ceiling = self._next + n - 1 + LEASE
            _store(conn, self._ceiling)
        first = self._next
        self._next += n
        return first

    def forget(self) -> None:
        """After a rollback (the lease may not be stored) or an append SQLite numbered:
        read the stored mark again before the next take."""
        self._ceiling = -1


def _stored(conn: sqlite3.Connection) -> int:
    """The highest number handed out or leased (SQLite's own mark, 0 for a new file)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    return 0 if row is None else int(row[0])


def _store(conn: sqlite3.Connection, ceiling: int) -> None:
    if not conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox'",
                        (ceiling,)).rowcount:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)",
                     (ceiling,))
