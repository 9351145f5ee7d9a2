"""Retry deduplication: keys of puts seen within the TTL (the ``seen`` table).

A put may carry keys (a callback body's hash); one whose key was seen recently is a
retry and stores nothing. Writer-thread functions, inside the writer's transaction."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from typing import Any


@functools.cache
def _seen_sql(n: int) -> str:
    return f"SELECT 1 FROM seen WHERE key IN ({','.join('?' * n)}) LIMIT 1"


@functools.cache
def _mark_sql(n: int) -> str:
    return "INSERT OR REPLACE INTO seen (key, at) VALUES " + ",".join(["(?, ?)"] * n)


def seen(conn: sqlite3.Connection, keys: Sequence[str]) -> bool:
    """Whether any of ``keys`` was marked (and not yet pruned)."""
    return bool(keys) and conn.execute(_seen_sql(len(keys)), keys).fetchone() is not None


def mark(conn: sqlite3.Connection, keys: Sequence[str], now: float) -> None:
    """Mark ``keys`` as seen at ``now``, in one statement (executemany cost a step each)."""
    if keys:
        args: list[Any] = []
        for key in keys:
            args += (key, now)
        conn.execute(_mark_sql(len(keys)), args)


def prune(conn: sqlite3.Connection, before: float) -> None:
    """Forget keys marked before ``before`` (past the TTL)."""
    conn.execute("DELETE FROM seen WHERE at < ?", (before,))
