"""What a backlog sends next: each robot's newest state and every event first.

After an outage the outbox holds an hour of poses behind the fresh state; sent in seq
order, the cloud would show the fleet as it was an hour ago until the whole backlog is
through. While a backlog exists the publisher asks this module instead:

1. **Current**: every entry without a ``compact_key`` (status changes, events, tasks,
   gateway traffic: never superseded, never dropped, always in seq order among
   themselves), and the newest entry of each ``compact_key`` (a robot's pose, power or
   move): in seq order.
2. **History**: the superseded entries (an older entry of a ``compact_key`` that has a
   newer one), in seq order after the current ones, each marked ``replay`` so the cloud
   logs it and never merges it into state.

"Newest" is the greatest seq of a key. That is the robot-time order too: the edge's
webhook refuses (as superseded) a downsampled message older by robot time than what the
robot already sent on its channel, so within a key seq order is robot-time order. This
module is the one place the ordering rule lives; a different rule for robot clocks
(issue 24) replaces ``_CURRENT`` and ``_HISTORY`` here.
"""

from __future__ import annotations

import sqlite3
from typing import Any

_NEWEST = "SELECT MAX(seq) FROM outbox WHERE compact_key IS NOT NULL GROUP BY compact_key"
_COLUMNS = "seq, topic, payload, qos, retain, compact_key"
_CURRENT = (f"SELECT {_COLUMNS} FROM outbox WHERE compact_key IS NULL OR seq IN ({_NEWEST})"
            " ORDER BY seq LIMIT ?")
_HISTORY = (f"SELECT {_COLUMNS} FROM outbox WHERE compact_key IS NOT NULL"
            f" AND seq NOT IN ({_NEWEST}) ORDER BY seq LIMIT ?")

Row = tuple[Any, ...]


class DrainOrder:
    """The drain order, remembering per ``compact_key`` the newest seq sent as current:
    once a robot's newest pose is out, what is left of its older ones is history even
    when it has become the newest left in the outbox. Forgotten when a plan finds no
    history left (the drain is over). Not kept across a restart: an older entry sent
    as current after one is still ordered by the cloud's store, by robot time."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

    def plan(self, conn: sqlite3.Connection, limit: int) -> list[tuple[Row, bool]]:
        """Up to ``limit`` rows (seq, topic, payload, qos, retain) in drain order, each
        with whether it is history (``replay``): what is current first, history in what
        is left (so fresh traffic during a drain neither starves history nor waits
        behind it)."""
        current: list[Row] = []
        history: list[Row] = []
        for row in conn.execute(_CURRENT, (limit,)).fetchall():
            key = row[5]
            if key is not None and row[0] < self.sent.get(key, -1):
                history.append(row)  # older than what went out as this key's newest
                continue
            if key is not None:
                self.sent[key] = row[0]
            current.append(row)
        if len(current) + len(history) < limit:
            history += conn.execute(_HISTORY,
                                    (limit - len(current) - len(history),)).fetchall()
        if not history and len(current) < limit:
            self.sent.clear()  # nothing superseded is left: the drain is over
        history.sort(key=lambda row: row[0])
        return [(row[:5], False) for row in current] + [(row[:5], True) for row in history]
