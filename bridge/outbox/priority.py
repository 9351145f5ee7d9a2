"""What a backlog sends next: each robot's newest state and every event first.

After an outage the outbox holds an hour of poses behind the fresh state; sent in seq
order, the cloud would show the fleet as it was an hour ago until the whole backlog is
through. While a backlog exists the publisher asks this module instead, round by round:

1. **Newest state**: of each state topic (one robot's ``status``, ``pose``, ``power`` or
   ``move``), the newest entry by robot time (``ord``, the ``order`` of its put; seq
   breaks ties and stands in where no robot time was recorded), in seq order.
2. **Everything else current**: events, tasks, other callbacks, gateway traffic: never
   superseded, never dropped, in seq order (the order they were accepted).
3. **History**: the other entries of state topics, in seq order, each marked ``replay``
   so the cloud logs them and never merges them into state.

Once a topic's newest went out, what is left of it older by robot time is history even
when it has become the newest left (``DrainOrder.sent``); a fresh one that is newer is
current again. This module is the one place the ordering rule lives: issue 24's rule
for robot clocks replaces ``_RANKED``'s ``ORDER BY`` and ``DrainOrder``'s comparison.
"""

from __future__ import annotations

import sqlite3
from typing import Any

#: Topics whose messages are a robot's latest state (the rest are events and the like).
STATE_CHANNELS = ("status", "pose", "power", "move")
_STATE = "(" + " OR ".join(f"topic LIKE '%/{c}'" for c in STATE_CHANNELS) + ")"
_COLUMNS = "seq, topic, payload, qos, retain, ord"
_RANKED = (f"SELECT {_COLUMNS}, ROW_NUMBER() OVER (PARTITION BY topic"
           " ORDER BY COALESCE(ord, 0) DESC, seq DESC) AS rank"
           f" FROM outbox WHERE {_STATE}")
_NEWEST = f"SELECT {_COLUMNS} FROM ({_RANKED}) WHERE rank = 1 ORDER BY seq LIMIT ?"
_OTHERS = f"SELECT {_COLUMNS} FROM outbox WHERE NOT {_STATE} ORDER BY seq LIMIT ?"
_HISTORY = f"SELECT {_COLUMNS} FROM ({_RANKED}) WHERE rank > 1 ORDER BY seq LIMIT ?"

Row = tuple[Any, ...]


def migrate(conn: sqlite3.Connection) -> None:
    """An outbox file from before the ``ord`` column gains it (its rows: NULL)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if "ord" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN ord REAL")


class DrainOrder:
    """The drain order, remembering per state topic the robot time of the newest sent
    as current. Forgotten when a plan finds nothing left but current entries (the
    drain is over). Not kept across a restart: an older state sent as current after one
    is still ordered by the cloud's store by robot time."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[float, int]] = {}

    def plan(self, conn: sqlite3.Connection, limit: int) -> list[tuple[Row, bool]]:
        """Up to ``limit`` rows (seq, topic, payload, qos, retain) in drain order, each
        with whether it is history (``replay``)."""
        current: list[Row] = []
        history: list[Row] = []
        for row in conn.execute(_NEWEST, (limit,)).fetchall():
            stamp = (row[5] or 0.0, row[0])
            if stamp < self.sent.get(row[1], (float("-inf"), -1)):
                history.append(row)  # older than what went out as this topic's newest
                continue
            self.sent[row[1]] = stamp
            current.append(row)
        if len(current) < limit:
            current += conn.execute(_OTHERS, (limit - len(current),)).fetchall()
        room = limit - len(current) - len(history)
        if room > 0:
            history += conn.execute(_HISTORY, (room,)).fetchall()
        if not history and len(current) < limit:
            self.sent.clear()  # nothing superseded is left: the drain is over
        history.sort(key=lambda row: row[0])
        return [(row[:5], False) for row in current] + [(row[:5], True) for row in history]
