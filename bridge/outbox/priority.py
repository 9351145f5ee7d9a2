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
_COLUMNS = "seq, topic, payload, qos, retain"
#: Each state topic's newest (seq, topic, robot time): at most one row per robot and
#: state channel, read without payloads.
_NEWEST = (f"SELECT seq, topic, ord FROM (SELECT seq, topic, ord, ROW_NUMBER() OVER"
           f" (PARTITION BY topic ORDER BY COALESCE(ord, 0) DESC, seq DESC) AS rank"
           f" FROM outbox WHERE {_STATE}) WHERE rank = 1 ORDER BY seq")
_OTHERS = f"SELECT {_COLUMNS} FROM outbox WHERE NOT {_STATE} ORDER BY seq LIMIT ?"

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
        with whether it is history (``replay``): history only once no newest state and
        no event is left to send."""
        chosen: list[int] = []
        for seq, topic, order in conn.execute(_NEWEST):
            if len(chosen) >= limit:
                break
            stamp = (order or 0.0, seq)
            if stamp < self.sent.get(topic, (float("-inf"), -1)):
                continue  # older than what went out as this topic's newest: history
            self.sent[topic] = stamp
            chosen.append(seq)
        current = _rows(conn, f"SELECT {_COLUMNS} FROM outbox WHERE seq IN ({{}})"
                        " ORDER BY seq", chosen)
        if len(current) < limit:
            current += conn.execute(_OTHERS, (limit - len(current),)).fetchall()
        history: list[Row] = []
        if len(current) < limit:
            history = _rows(conn, f"SELECT {_COLUMNS} FROM outbox WHERE {_STATE}"
                            " AND seq NOT IN ({}) ORDER BY seq LIMIT ?", chosen,
                            limit - len(current))
        if not history and len(current) < limit:
            self.sent.clear()  # nothing superseded is left: the drain is over
        return [(row, False) for row in current] + [(row, True) for row in history]


def _rows(conn: sqlite3.Connection, sql: str, seqs: list[int], *more: Any) -> list[Row]:
    """``sql`` with ``{}`` replaced by one placeholder per seq (none: an empty list)."""
    if not seqs and "NOT IN" not in sql:
        return []
    marks = ",".join("?" * len(seqs)) or "-1"  # NOT IN (NULL) would match nothing
    return conn.execute(sql.format(marks), (*seqs, *more)).fetchall()
