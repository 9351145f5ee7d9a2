"""Compaction at the bound (``max_entries``), without an index on ``compact_key``.

An entry with a ``compact_key`` (a robot's pose or power state) is superseded by a newer
one of the same key; at the bound the superseded are dropped to make room. An index on
the key found them, but every put wrote a page of it, at a random place in a backlog:
one page in three of what a callback at a trickle wrote. Instead the first time the
bound is reached one scan drops them and reads each key's newest entry; from then on the
writer remembers each key's newest entry and lists every entry a newer one supersedes,
so each later compaction deletes by number. Stale numbers (entries acknowledged or set
aside meanwhile) delete nothing. What is remembered is forgotten after a failed write
(it may name entries rolled back) and once it grows past ``MAX_LISTED`` entries or
``MAX_KEYS`` keys, and read again by a scan the next time; an outbox of more keys than
that (a fleet's robots and channels are a few thousand) is compacted by scans alone.

Writer-thread only, like every statement here.
"""

from __future__ import annotations

import sqlite3
from array import array
from collections.abc import Callable, Iterable

#: Superseded entries listed at most between two compactions (8 bytes each).
MAX_LISTED = 100_000
#: Compact keys remembered at most (~100 bytes each).
MAX_KEYS = 100_000
#: Removes entries by seq; how many were there (the outbox's own removal).
Delete = Callable[[sqlite3.Connection, list[int]], int]

_DROP_SUPERSEDED = (
    "DELETE FROM outbox WHERE compact_key IS NOT NULL AND seq NOT IN"
    " (SELECT MAX(seq) FROM outbox WHERE compact_key IS NOT NULL GROUP BY compact_key)")


class Compaction:
    """Each compact key's newest entry and the entries superseded since the last
    compaction; nothing until the bound is first reached."""

    def __init__(self, delete: Delete) -> None:
        self._delete = delete
        self._newest: dict[str, int] | None = None
        self._superseded = array("q")

    def appended(self, keys: Iterable[str | None], first: int) -> None:
        """Entries ``first``, ``first + 1``, ... were appended with ``keys``: the ones they
        supersede are listed. Called once a statement; until the bound is first reached
        (nearly always) it returns at once, so the puts below it pay one call, not one a
        put."""
        for seq, key in enumerate(keys, start=first):
            newest = self._newest
            if newest is None:  # nothing remembered, or just forgotten
                return
            if key is None:
                continue
            older = newest.get(key)
            newest[key] = seq
            if older is not None:
                self._superseded.append(older)
                if len(self._superseded) > MAX_LISTED:
                    self.forget()
            elif len(newest) > MAX_KEYS:
                self.forget()

    def make_room(self, conn: sqlite3.Connection, key: str | None) -> int:
        """Drop the superseded entries; if there are none, the newest one of ``key``
        (the entry about to be put supersedes it). How many were dropped."""
        if self._newest is None:
            freed = conn.execute(_DROP_SUPERSEDED).rowcount
            newest = conn.execute("SELECT compact_key, seq FROM outbox WHERE compact_key IS"
                                  " NOT NULL LIMIT ?", (MAX_KEYS + 1,)).fetchall()
            if len(newest) > MAX_KEYS:  # too many to remember: scans alone
                if not freed and key is not None:
                    freed = conn.execute("DELETE FROM outbox WHERE compact_key = ?",
                                         (key,)).rowcount
                return max(freed, 0)
            self._newest = {str(k): int(s) for k, s in newest}
        else:
            listed, self._superseded = self._superseded.tolist(), array("q")
            freed = self._delete(conn, listed)
        if not freed and key is not None:
            last = self._newest.pop(key, None)
            if last is not None:
                freed = self._delete(conn, [last])
        return max(freed, 0)

    def forget(self) -> None:
        """Read it all again, by a scan, the next time the bound is reached."""
        self._newest, self._superseded = None, array("q")
