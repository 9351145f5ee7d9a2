"""Retry deduplication: keys of puts seen within the TTL (the ``seen`` table).

A put may carry keys (a callback body's ``body_key``); one whose key was seen recently is
a retry and stores nothing. Writer-thread functions, inside the writer's transaction,
except ``body_key``."""

from __future__ import annotations

import functools
import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

#: Keys one statement names at most (SQLite's limit on parameters is far above).
_CHUNK = 256
#: A key: text (``poll:<id>``) or bytes (``body_key``); the two never compare equal.
Key = str | bytes


#: Robot times (epoch seconds) whose milliseconds fit a key's 8 bytes.
_TS_LIMIT = 2**63 / 1000


def body_key(raw: bytes, robot_ts: float | None) -> bytes:
    """A callback body's key: its robot time in milliseconds (0 without one), then 16
    bytes of its SHA-256; a retry, the same body, has the same key.

    The time first, because ``seen`` is a B-tree by key: keys led by their hash landed
    on a random page each, so a commit of n puts wrote n pages of the tree to the WAL,
    where keys arriving in about the order they sort share the last few (the edge's CPU
    per accept 203 -> 175 µs on the bench, docs/benchmarks.md). 128 bits of the hash
    keep two different bodies of one millisecond apart."""
    # Past 8 bytes of milliseconds (or NaN, infinite): no time, as without one. The
    # normaliser bounds robot times already; a key must not depend on that.
    millis = round(robot_ts * 1000) if robot_ts is not None and 0 < robot_ts < _TS_LIMIT else 0
    return millis.to_bytes(8, "big") + hashlib.sha256(raw).digest()[:16]


@functools.cache
def _mark_sql(n: int) -> str:
    return "INSERT OR REPLACE INTO seen (key, at) VALUES " + ",".join(["(?, ?)"] * n)


@functools.cache
def _seen_of_sql(n: int) -> str:
    return f"SELECT key FROM seen WHERE key IN ({','.join('?' * n)})"


def seen_of(conn: sqlite3.Connection, keys: Iterable[Key]) -> set[Key]:
    """Which of ``keys`` were marked (and not yet pruned); one query for the keys of
    many puts."""
    wanted, found = list(set(keys)), set[Key]()
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i:i + _CHUNK]
        found.update(k for (k,) in conn.execute(_seen_of_sql(len(chunk)), chunk))
    return found


def mark(conn: sqlite3.Connection, keys: Sequence[Key], now: float) -> None:
    """Mark ``keys`` as seen at ``now``, ``_CHUNK`` keys a statement (executemany cost a
    step each)."""
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i:i + _CHUNK]
        args: list[Any] = []
        for key in chunk:
            args += (key, now)
        conn.execute(_mark_sql(len(chunk)), args)


#: A body key led by a robot time up to this far past the prune's clock is left for a
#: later prune to read (see ``prune``).
AHEAD_SECONDS = 60.0


def _millis(seconds: float) -> bytes:
    """The 8 bytes a body key leads with for a robot time of ``seconds``."""
    return min(max(round(seconds * 1000), 0), 2**64 - 1).to_bytes(8, "big")


def prune(conn: sqlite3.Connection, before: float, now: float) -> None:
    """Forget keys marked before ``before`` (past the TTL), reading two ranges of the
    table's B-tree rather than an index on ``at`` (which cost every commit a page).

    A body key leads with its robot time, so the keys due are nearly all those led by a
    time before ``before``; below them sort the text keys and the bodies without a robot
    time. Past ``now + AHEAD_SECONDS`` lie those of robots whose clocks run ahead. Left
    unread between the two: keys of the last TTL, and those of a clock ahead by at most
    the TTL and ``AHEAD_SECONDS`` when marked, which go once their robot time falls
    before ``before``: so a key is kept at most twice the TTL and a minute."""
    low, high = _millis(before), _millis(now + AHEAD_SECONDS)
    conn.execute("DELETE FROM seen WHERE key < ? AND at < ?", (low, before))
    conn.execute("DELETE FROM seen WHERE key > ? AND at < ?", (high, before))
