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
_COLUMNS = "seq, topic, payload, qos, retain"
_CURRENT = (f"SELECT {_COLUMNS} FROM outbox WHERE compact_key IS NULL OR seq IN ({_NEWEST})"
            " ORDER BY seq LIMIT ?")
_HISTORY = (f"SELECT {_COLUMNS} FROM outbox WHERE compact_key IS NOT NULL"
            f" AND seq NOT IN ({_NEWEST}) ORDER BY seq LIMIT ?")


def plan(conn: sqlite3.Connection, limit: int) -> list[tuple[tuple[Any, ...], bool]]:
    """Up to ``limit`` rows (seq, topic, payload, qos, retain) in drain order, each with
    whether it is history (``replay``): what is current first, history in what is left
    (so fresh traffic during a drain never starves the history, nor waits behind it)."""
    current = conn.execute(_CURRENT, (limit,)).fetchall()
    out = [(row, False) for row in current]
    if len(current) < limit:
        out += [(row, True) for row in
                conn.execute(_HISTORY, (limit - len(current),)).fetchall()]
    return out
