"""Retry deduplication: keys of puts seen within the TTL (the ``seen`` table).

A put may carry keys (a callback body's hash); one whose key was seen recently is a
retry and stores nothing. Writer-thread functions, inside the writer's transaction."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

#: Keys one statement names at most (SQLite's limit on parameters is far above).
_CHUNK = 256


@functools.cache
def _mark_sql(n: int) -> str:
    return "INSERT OR REPLACE INTO seen (key, at) VALUES " + ",".join(["(?, ?)"] * n)


@functools.cache
def _seen_of_sql(n: int) -> str:
    return f"SELECT key FROM seen WHERE key IN ({','.join('?' * n)})"


def seen_of(conn: sqlite3.Connection, keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` were marked (and not yet pruned); one query for the keys of
    many puts."""
    wanted, found = sorted(set(keys)), set[str]()
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i:i + _CHUNK]
        found.update(k for (k,) in conn.execute(_seen_of_sql(len(chunk)), chunk))
    return found


def mark(conn: sqlite3.Connection, keys: Sequence[str], now: float) -> None:
    """Mark ``keys`` as seen at ``now``, ``_CHUNK`` keys a statement (executemany cost a
    step each)."""
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i:i + _CHUNK]
        args: list[Any] = []
        for key in chunk:
            args += (key, now)
        conn.execute(_mark_sql(len(chunk)), args)


def prune(conn: sqlite3.Connection, before: float) -> None:
    """Forget keys marked before ``before`` (past the TTL)."""
    conn.execute("DELETE FROM seen WHERE at < ?", (before,))
