"""What a backlog sends next: fresh callbacks, each robot's newest state and every event
first.

After an outage the outbox holds an hour of poses behind the fresh state; sent in seq
order, the cloud would show the fleet as it was an hour ago until the whole backlog is
through. While a backlog exists the publisher asks this module instead, round by round:

1. **Fresh**: what arrived since the previous round was planned (a seq above the highest
   there was then), in seq order, so a callback arriving during a drain goes out in the
   next round however much of the backlog is left. A fresh state older by robot time
   than its topic's newest already sent goes as history. Any other fresh entry (an
   event, a task, ...) takes its robot's older ones still waiting along, in front of it:
   each robot's keep the order they were accepted in; across robots they may not (the
   cloud merges state and tasks by robot time and stores each event once by its id:
   nothing there compares one robot's messages with another's).
2. **Newest state**: of each state topic (one robot's ``status``, ``pose``, ``power`` or
   ``move``), the newest entry by robot time (``ord``, the ``order`` of its put; seq
   breaks ties and stands in where no robot time was recorded), the last accepted first:
   a callback that came as the drain began (before its first round was planned, so not
   fresh) goes ahead of the backlog's older news.
3. **Everything else current**: events, tasks, other callbacks, gateway traffic: never
   superseded, never dropped, in seq order (the order they were accepted).
4. **History**: the other entries of state topics, in seq order, each marked ``replay``
   so the cloud logs them and never merges them into state.

Once a topic's newest went out, what is left of it older by robot time is history even
when it has become the newest left (``DrainOrder.sent``); a fresh one that is newer is
current again. This module is the one place the drain's order lives; it orders by the
``ord`` each put recorded (bridge/clock.py's rule for robot clocks), in ``_NEWEST``'s
``ORDER BY`` and ``DrainOrder``'s comparisons.
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
           f" FROM outbox WHERE {_STATE}) WHERE rank = 1 ORDER BY seq DESC")
#: What arrived after a seq (seq, topic, robot time, whether of a state topic).
_FRESH = f"SELECT seq, topic, ord, {_STATE} FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"
#: The entries of no state topic up to a seq (the backlog's events and the like).
_WAITING = f"SELECT seq, topic FROM outbox WHERE NOT {_STATE} AND seq <= ? ORDER BY seq"
_NEVER = (float("-inf"), -1)

Row = tuple[Any, ...]


def migrate(conn: sqlite3.Connection) -> None:
    """An outbox file from before the ``ord`` column gains it (its rows: NULL)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if "ord" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN ord REAL")


class DrainOrder:
    """The drain order, remembering per state topic the robot time of the newest sent
    as current, and the highest seq when the last round was planned (what is above it
    is fresh). Forgotten when a plan finds nothing left but current entries (the drain
    is over). Not kept across a restart: an older state sent as current after one is
    still ordered by the cloud's store by robot time."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[float, int]] = {}
        #: The highest seq as the previous round was planned; None in a drain's first.
        self.seen: int | None = None

    def plan(self, conn: sqlite3.Connection, limit: int) -> list[tuple[Row, bool]]:
        """Up to ``limit`` rows (seq, topic, payload, qos, retain) in drain order, each
        with whether it is history (``replay``): the backlog's history only once no
        fresh entry, newest state and event is left to send."""
        top = conn.execute("SELECT MAX(seq) FROM outbox").fetchone()[0]
        picked: dict[int, bool] = {}  # seq -> history, in drain order
        if self.seen is not None:
            self._fresh(conn, self.seen, limit, picked)
        self.seen = top
        for seq, topic, order in conn.execute(_NEWEST):
            if len(picked) >= limit:
                break
            stamp = (order or 0.0, seq)
            if seq in picked or stamp < self.sent.get(topic, _NEVER):
                continue  # fresh, or older than this topic's newest sent: history
            self.sent[topic] = stamp
            picked[seq] = False
        rows = {row[0]: row for row in _rows(
            conn, f"SELECT {_COLUMNS} FROM outbox WHERE seq IN ({{}})", list(picked))}
        plan = [(rows[seq], history) for seq, history in picked.items() if seq in rows]
        if len(plan) < limit:
            plan += [(row, False) for row in _rows(
                conn, f"SELECT {_COLUMNS} FROM outbox WHERE NOT {_STATE}"
                " AND seq NOT IN ({}) ORDER BY seq LIMIT ?", list(picked), limit - len(plan))]
        history: list[Row] = []
        if len(plan) < limit:
            history = _rows(conn, f"SELECT {_COLUMNS} FROM outbox WHERE {_STATE}"
                            " AND seq NOT IN ({}) ORDER BY seq LIMIT ?", list(picked),
                            limit - len(plan))
        if not history and len(plan) < limit:
            self.sent.clear()  # nothing superseded is left: the drain is over
            self.seen = None
        return plan + [(row, True) for row in history]

    def _fresh(self, conn: sqlite3.Connection, after: int, limit: int,
               picked: dict[int, bool]) -> None:
        """Pick what arrived after seq ``after``, in seq order, up to the first that does
        not fit in ``limit`` (the rest waits in the backlog): each fresh state, as
        history if older than its topic's newest sent; each other entry after its
        robot's older ones still waiting."""
        fresh = conn.execute(_FRESH, (after, limit)).fetchall()
        robots = {_robot(topic) for _, topic, _, state in fresh if not state}
        waiting: dict[str, list[int]] = {}
        if robots:
            for seq, topic in conn.execute(_WAITING, (after,)):
                robot = _robot(topic)
                if robot in robots:
                    waiting.setdefault(robot, []).append(seq)
        for seq, topic, order, state in fresh:
            if state:
                if len(picked) >= limit:
                    return
                stamp = (order or 0.0, seq)
                history = stamp < self.sent.get(topic, _NEVER)
                if not history:
                    self.sent[topic] = stamp
                picked[seq] = history
                continue
            before = waiting.pop(_robot(topic), [])
            if len(picked) + len(before) >= limit:
                return  # its robot's older ones and it do not fit: the next round
            picked.update(dict.fromkeys(before, False))
            picked[seq] = False


def _robot(topic: str) -> str:
    """The ``…org/{org}/device/{device}`` of a topic in the product's scheme (any other
    topic: itself), whose entries keep their order when a fresh one goes first."""
    parts = topic.split("/")
    for i in range(len(parts) - 4):
        if parts[i] == "org" and parts[i + 2] == "device":
            return "/".join(parts[:i + 4])
    return topic


def _rows(conn: sqlite3.Connection, sql: str, seqs: list[int], *more: Any) -> list[Row]:
    """``sql`` with ``{}`` replaced by one placeholder per seq (none: an empty list)."""
    if not seqs and "NOT IN" not in sql:
        return []
    marks = ",".join("?" * len(seqs)) or "-1"  # NOT IN (NULL) would match nothing
    return conn.execute(sql.format(marks), (*seqs, *more)).fetchall()
