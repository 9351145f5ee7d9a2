"""The store: migrations, batched idempotent writes, dead letters and the read API.

Backend-agnostic: statements come from the Dialect, rows from rows.py, and the
backend runs them. Every write is one transaction that is safe to run again, so the
caller retries a failed batch whole (see ``write_batch``).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import decimal
import functools
import hashlib
import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from bridge.clock import MAX_SKEW_SECONDS, RobotClocks
from bridge.commands import CommandOutcome
from bridge.errors import ConfigError, StoreError, StoreRejectedError
from bridge.http.paging import Page
from callback_server.store.base import Backend, Query, Statement, keyed
from callback_server.store.migration import Migration
from callback_server.store.projection import Projection
from callback_server.store.query import Where
from callback_server.store.robot_tasks import task_rows
from callback_server.store.rows import (
    BatchRows,
    Item,
    build_rows,
    channel_of,
    is_robot_state,
    key,
    number,
    text,
    when,
)
from callback_server.store.schema import (
    CLAIMS,
    CLAIMS_TABLE,
    COMMAND_TABLE,
    COMMANDS,
    DEAD_LETTERS,
    DEAD_TABLE,
    HISTORY_EVERY_SECONDS,
    HISTORY_FIELDS,
    HISTORY_TABLE,
    LOG,
    LOG_TABLE,
    OWN_EVENTS,
    OWN_EVENTS_TABLE,
    PRUNABLE,
    RUNS,
    RUNS_TABLE,
    STATE_TABLE,
    TASK_FIELDS,
    TASKS,
    TASKS_TABLE,
)
from callback_server.store.targets import Targets

log = logging.getLogger(__name__)

#: Robots per history or projection statement (a batch holds at most a few hundred).
_HISTORY_CHUNK = 500
_LOG_ID, _LOG_ORG = LOG.column("id").size, LOG.column("org_id").size

#: Keys of a robot as the read API returns it.
ROBOT_FIELDS = ("robot_sn", "org_id", "gateway_id", "status", "battery_level", "charge_state",
                "is_charging", "move_state", "water_level", "sewage_level", "x", "y", "z", "yaw",
                "map_name", "last_updated", "last_ts")
#: Keys of an event as the read API returns it.
EVENT_FIELDS = ("robot_sn", "event_id", "event_level", "event_type", "event_detail",
                "task_time", "upload_time", "callback_type", "org_id", "gateway_id", "ts")


#: Keys of an ingestion run as ``GET /ingestion-runs`` returns it.
RUN_FIELDS = ("run_id", "org_id", "gateway_id", "status", "started_at", "ended_at", "shops",
              "shops_failed", "robots_seen", "envelopes_published", "events_backfilled",
              "api_calls", "api_retries", "errors", "error", "window_start", "window_end")


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one ``write_batch`` changed."""

    messages: int  # items in the batch
    logged: int    # new rows in the raw message log; the rest were redeliveries
    events: int    # new event rows (robot_events)
    robots: int    # robots whose state row was upserted (robot_state, and the targets)
    skewed: int = 0  # messages whose robot time was too far ahead (ordered by our clock)
    #: Envelope ids of items that were already stored before this batch (an idempotent
    #: retry): the ingest answer's ``duplicate`` outcome; every other item was stored.
    duplicate_ids: frozenset[str] = frozenset()

    @property
    def duplicates(self) -> int:
        """Messages whose envelope id was already logged (redelivered or replayed)."""
        return self.messages - self.logged


def _iso(value: Any) -> Any:
    """A stored UTC datetime as ISO 8601 with milliseconds and ``Z``."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, dt.datetime):
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value
        return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")
    return value


def _plain(name: str, value: Any) -> Any:
    if name in ("last_updated", "task_time", "upload_time", "started_at", "ended_at"):
        return _iso(value)
    if name in ("shops", "shops_failed") and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if name == "is_charging" and value is not None:
        return bool(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _already_logged(items: Sequence[Item], logged: list[dict[str, Any]]) -> frozenset[str]:
    """Envelope ids of ``items`` among the raw log's ``logged`` rows (org and id, both
    as stored: cut to their columns)."""
    ids: dict[tuple[str, str], str] = {}
    for item in items:
        env = item[1] if isinstance(item, tuple) else item
        ids.setdefault((key(env.org, _LOG_ORG), key(env.id, _LOG_ID)), env.id)
    found = (ids.get((str(r["org_id"]), str(r["id"]))) for r in logged)
    return frozenset(env_id for env_id in found if env_id is not None)


class SqlStore:
    """Latest robot state, events, the raw message log and dead letters, in SQL.

    An async context manager; connecting happens on first use, so entering it works
    while the database is down. Tables are created (``migrate``) before the first
    write or read if the caller has not done it.
    """

    def __init__(self, backend: Backend, targets: Targets | None = None,
                 *, max_skew: float = MAX_SKEW_SECONDS) -> None:
        self.backend = backend
        self.dialect = backend.dialect
        self.targets = targets or Targets()
        self.max_skew = max_skew
        # the ordering rule's per-robot state (bridge/clock.py): the order each robot
        # message is merged by; in memory, so a restart orders a robot's first untimed
        # message as if it were max_skew old (docs/clocks.md)
        self.clocks = RobotClocks(max_skew)
        self._migrated = False
        self._migrate_lock = asyncio.Lock()
        self._limits: dict[str, dict[str, int]] = {}
        self._projections: list[Projection] = []
        self._claims: dict[tuple[str, str], str] = {}  # (target, sn key) -> org, as read
        self._warned: set[tuple[str, str, str]] = set()
        #: Values cut to a target's narrower text column, by (target, column) (logged once
        #: for each: the docs promise the cut, the log says where it happens).
        self.cut: collections.Counter[tuple[str, str]] = collections.Counter()
        d = self.dialect
        self._log_sql = d.insert_ignore(LOG_TABLE, LOG.names)
        self._runs_sql = d.insert_ignore(RUNS_TABLE, RUNS.names)
        self._event_sql = d.insert_ignore(OWN_EVENTS_TABLE, OWN_EVENTS.names)
        # a task's state moves only forward in robot time (ts last: MySQL assigns in order)
        newer = f"{d.new('ts')} >= COALESCE(ts, {d.new('ts')})"
        columns = [c for c in TASKS.names if c not in (*TASKS.key, "ts")] + ["ts"]
        self._task_sql = d.upsert(TASKS_TABLE, TASKS.names, TASKS.key, {
            c: f"CASE WHEN {newer} THEN {d.new(c)} ELSE {c} END" for c in columns})
        self._history_sql = functools.lru_cache(maxsize=64)(functools.partial(
            d.history_points, HISTORY_TABLE, STATE_TABLE, HISTORY_EVERY_SECONDS))
        self._replay_sql = d.replay_point(HISTORY_TABLE, HISTORY_EVERY_SECONDS)

    async def __aenter__(self) -> SqlStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self.backend.close()

    # -- schema -------------------------------------------------------------------------
    async def migrate(self, *, apply: bool = True, drop_added: bool = False) -> list[str]:
        """Create and upgrade the own tables, read the targets' shapes; idempotent, safe
        to race. Returns what it found and did, one line each (``callback-server migrate``
        prints them); ``apply=False`` only says what it would do. See migration.py.

        StoreError when the database is unreachable or a target lacks the key the store
        writes by.
        """
        async with self._migrate_lock:
            return await self._migrate(apply=apply, drop_added=drop_added)

    async def _migrate(self, *, apply: bool, drop_added: bool = False) -> list[str]:
        """``migrate``'s work, the lock held by the caller."""
        outcome = await Migration(self.backend, self.targets, apply=apply,
                                  drop_added=drop_added).run()
        if not apply:
            return outcome.lines
        limits: dict[str, dict[str, int]] = {"robots": {}, "events": {}, "log": {}}
        for p in outcome.projections:
            mine = limits[p.kind]
            for column, limit in p.limits().items():
                mine[column] = min(mine.get(column, limit), limit)
        self._limits = limits
        self._projections = outcome.projections
        self._migrated = True
        return outcome.lines

    async def _ready(self) -> None:
        """Migrate once: what waited for the first migration (the batches in flight at
        launch, a health ping, the alerts) finds it done instead of running it again."""
        if self._migrated:
            return
        async with self._migrate_lock:
            if not self._migrated:
                await self._migrate(apply=True)

    async def ready(self) -> None:
        """Migrate first if nobody has: for parts that run their own SQL (alerts)."""
        await self._ready()

    # -- writes -------------------------------------------------------------------------
    async def write_batch(self, items: Sequence[Item]) -> BatchResult:
        """Write a batch of messages in one transaction; safe to retry whole.

        ``items`` are ``(topic, envelope)`` pairs (the topic goes to the raw log) or
        bare envelopes (topic rebuilt without prefix). Per batch: every envelope into
        the raw log unless its (org, id) is there; every event into ``robot_events``
        unless ``(org, sn, event_id)`` is there; one upsert per (org, robot) into
        ``robot_state`` carrying the batch's newest value of each state group, applied
        only where it is not older than the stored one; then each target is projected
        from those rows (projection.py). So any order, split or repetition of the same
        messages leaves the same tables. StoreError if nothing was committed;
        StoreRejectedError (retrying cannot help) naming the target and column when a
        key does not fit a target.
        """
        if not items:
            return BatchResult(0, 0, 0, 0)
        await self._ready()
        now = time.time()
        self._check_targets(items)
        try:
            rows = build_rows(items, now=now, limits=self._limits, max_skew=self.max_skew,
                              clocks=self.clocks)
        except Exception as exc:  # any fault of the data, not of the database
            # Retrying cannot help: the batcher bisects to the message and dead-letters it.
            raise StoreRejectedError(f"cannot build rows: {type(exc).__name__}: {exc}") \
                from exc
        horizon = now + self.max_skew
        stamp = when(now)
        statements: list[Statement] = [
            (self._log_sql, rows.log), (self._event_sql, rows.events),
            (self.dialect.robot_upsert(STATE_TABLE, horizon), rows.robots),
            (self._runs_sql, rows.runs)]
        pairs = [(r[1], r[0]) for r in rows.robots]
        for i in range(0, len(pairs), _HISTORY_CHUNK):
            chunk = pairs[i:i + _HISTORY_CHUNK]
            statements.append((self._history_sql(len(chunk)),
                               [(stamp, *(v for pair in chunk for v in pair), horizon)]))
        statements.append((self._replay_sql, rows.history))
        statements.append((self._task_sql, task_rows(items, now)))
        claimed = await self._claims_before(rows)
        statements += self._projection_statements(rows, stamp)
        logged, counts = await self.backend.read_then_write(self._logged_reads(rows),
                                                            statements)
        duplicates = _already_logged(items, logged)
        for target_key, org in claimed.items():
            self._claims.setdefault(target_key, org)
        return BatchResult(messages=len(items), logged=counts[0], events=counts[1],
                           robots=len(rows.robots), skewed=rows.skewed,
                           duplicate_ids=duplicates)

    def _check_targets(self, items: Sequence[Item]) -> None:
        """StoreRejectedError for the first envelope whose sn or event id does not fit a
        target it would be written to, or whose position is out of a DECIMAL column's
        range there (the batcher bisects to it and dead-letters it with this reason,
        naming the target and column). A text the target's column cuts is counted and
        logged, once per target and column."""
        for item in items:
            topic, env = item if isinstance(item, tuple) else ("", item)
            channel = channel_of(topic, env)
            if not is_robot_state(channel, env):
                continue
            data = env.data
            event_id = data.get("event_id") if channel == "event" else None
            pose = channel in ("pose", "event") and number(data.get("x")) is not None \
                and number(data.get("y")) is not None  # as state_groups takes a position
            for p in self._projections:
                if p.owned or not p.table.takes(env.org):
                    continue  # an owned target is as wide as the own tables: keys fit
                reason = p.unfit("robot_sn", text(env.device, 0) or "")
                if p.kind == "events":
                    if reason is None and event_id not in (None, ""):
                        reason = p.unfit("event_id", text(event_id, 0) or "")
                elif pose and p.ranges:
                    for column in ("x", "y", "z", "yaw"):
                        value = number(data.get(column))
                        if reason is None and value is not None:
                            reason = p.out_of_range(column, value)
                if reason is not None:
                    raise StoreRejectedError(f"{reason} (envelope {env.id})")
                if p.cuts and (p.kind == "robots" or channel == "event"):
                    self._count_cuts(p, data, env.id)

    def _count_cuts(self, p: Projection, data: dict[str, Any], envelope: str) -> None:
        """Count (and the first time, log) the values of ``data`` that ``p``'s narrower
        text columns cut (a state or event field is the column of its name)."""
        for column, limit in p.cuts.items():
            value = data.get(column)
            if value is None:
                continue
            size = len(text(value, 0) or "")
            if size <= limit:
                continue
            self.cut[(p.name, column)] += 1
            if self.cut[(p.name, column)] == 1:
                log.warning(
                    "target %s: %s values longer than the column (%s) are cut to %d "
                    "characters; the first had %d characters (envelope %s). Said once per "
                    "column; widen it to keep them whole", p.name, column,
                    p.columns[column].declared, limit, size, envelope)

    def _logged_reads(self, rows: BatchRows) -> list[Query]:
        """Which of the batch's envelopes the raw log holds already, read at the start of
        the batch's transaction (a time stamp cannot tell: a retry can come within the
        same millisecond). One another replica logs meanwhile is answered ``stored``: it
        is."""
        d = self.dialect
        return keyed(lambda n: f"SELECT org_id, id FROM {d.quote(LOG_TABLE)}"
                               f" WHERE {d.pairs(('org_id', 'id'), n)}",
                     [(r[3], r[0]) for r in rows.log])

    async def _claims_before(self, rows: BatchRows) -> dict[tuple[str, str], str]:
        """Which org holds each of the batch's sns on each target (read before the batch,
        for the log line when another org's robot is not written there); the claims the
        batch itself makes, for the cache."""
        made: dict[tuple[str, str], str] = {}
        for p in self._projections:
            robots = rows.robots if p.kind == "robots" else rows.events
            org_at = 1 if p.kind == "robots" else 7
            wanted = {(p.fold(r[0]), r[org_at]) for r in robots if p.table.takes(r[org_at])}
            unknown = sorted({sn for sn, _ in wanted if (p.name, sn) not in self._claims})
            d = self.dialect
            for i in range(0, len(unknown), 500):
                chunk = unknown[i:i + 500]
                for r in await self.backend.fetch(
                        f"SELECT robot_key, org_id FROM {d.quote(CLAIMS_TABLE)} WHERE target ="
                        f" {d.mark} AND robot_key IN ({d.marks(len(chunk))})", [p.name, *chunk]):
                    self._claims[(p.name, str(r["robot_key"]))] = str(r["org_id"])
            for sn, org in sorted(wanted):
                holder = self._claims.get((p.name, sn)) or made.setdefault((p.name, sn), org)
                if holder != org and (p.name, sn, org) not in self._warned:
                    self._warned.add((p.name, sn, org))
                    log.warning(
                        "target %s holds one robot per sn and sn %r there is org %s's: the "
                        "robot %r of org %s is stored in the product's own tables but not "
                        "written to %s (set its orgs: in database_config.yaml to choose)",
                        p.name, sn, holder, sn, org, p.name)
        return made

    def _projection_statements(self, rows: BatchRows, stamp: str | None) -> list[Statement]:
        """Claims, then each target's projection of this batch's robots or events."""
        d = self.dialect
        out: list[Statement] = []
        claims: dict[tuple[str, str], tuple[Any, ...]] = {}
        for p in self._projections:
            org_at = 1 if p.kind == "robots" else 7
            for r in rows.robots if p.kind == "robots" else rows.events:
                if p.table.takes(r[org_at]) and (p.name, p.fold(r[0])) not in self._claims:
                    claims.setdefault((p.name, p.fold(r[0])), (p.name, p.fold(r[0]),
                                                               r[org_at], stamp))
        if claims:
            out.append((d.insert_ignore(CLAIMS_TABLE, CLAIMS.names),
                        [claims[k] for k in sorted(claims)]))
        for p in self._projections:
            keys: list[tuple[Any, ...]]
            if p.kind == "robots":
                keys = [(r[1], r[0]) for r in rows.robots if p.table.takes(r[1])]
            else:
                keys = [(r[7], r[0], r[1]) for r in rows.events if p.table.takes(r[7])]
            for i in range(0, len(keys), _HISTORY_CHUNK):
                chunk = keys[i:i + _HISTORY_CHUNK]
                out.append((p.statement(len(chunk)), [tuple(v for k in chunk for v in k)]))
        return out

    async def dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        """Keep one message we cannot use, with why (see ``dead_letters``)."""
        await self.dead_letters([(topic, payload, reason)])

    async def dead_letters(self, letters: Sequence[tuple[str, bytes, str]]) -> None:
        """Keep messages we cannot use, with why, in one transaction, instead of having
        them redelivered forever; the same topic and payload again (a redelivery after a
        crash between this commit and the ack) is kept once."""
        await self._ready()
        sizes = {c.name: c.size for c in DEAD_LETTERS.columns}
        now = when(time.time())
        rows = []
        for topic, payload, reason in letters:
            digest = hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\0" + payload)
            rows.append((
                text(topic, sizes["topic"]),
                text(payload.decode("utf-8", errors="backslashreplace"), sizes["payload"]),
                text(reason, sizes["reason"]), now, digest.hexdigest()))
        sql = self.dialect.insert_ignore(
            DEAD_TABLE, ("topic", "payload", "reason", "created_at", "digest"))
        await self.backend.transaction([(sql, rows)])

    async def record_command(self, outcome: CommandOutcome, key_name: str | None = None) -> None:
        """Keep a command, its outcome, round-trip time and the key that sent it (once per
        message id)."""
        await self._ready()
        sizes = {c.name: c.size for c in COMMANDS.columns}
        r = outcome.response
        result = None if r is None else (r.result if r.status == "success" else r.error)
        row = (key(outcome.command.message_id, sizes["message_id"]),
               key(outcome.org_id, sizes["org_id"]), text(outcome.device_id, sizes["device_id"]),
               text(outcome.command.command, sizes["command"]),
               text(json.dumps(outcome.command.args, default=str), sizes["args"]),
               "timeout" if r is None else text(r.status, sizes["outcome"]),
               None if result is None else text(json.dumps(result, default=str),
                                                sizes["result"]),
               when(outcome.sent_at), outcome.rtt_ms,
               None if key_name is None else text(key_name, sizes["key_name"]))
        sql = self.dialect.insert_ignore(COMMAND_TABLE, COMMANDS.names)
        await self.backend.transaction([(sql, [row])])

    async def prune(self, table: str, older_than: float, batch: int = 5000) -> int:
        """Delete up to ``batch`` rows of ``table`` older than ``older_than``; how many.

        Small batches: each is its own short transaction, so pruning a big backlog
        never holds locks the ingest path waits on for long.
        """
        await self._ready()
        spec = PRUNABLE[table]
        assert spec.aged_by is not None
        sql = self.dialect.delete_older(table, spec.aged_by, batch)
        counts = await self.backend.transaction([(sql, [(when(older_than),)])])
        return counts[0]

    # -- reads: the own tables only ------------------------------------------------------
    async def get_robots(self) -> list[dict[str, Any]]:
        """Latest state of every robot, ordered by sn and org."""
        await self._ready()
        rows = await self.backend.fetch(
            f"SELECT {', '.join(ROBOT_FIELDS)} FROM {self.dialect.quote(STATE_TABLE)}"
            f" ORDER BY robot_sn, org_id")
        return [{k: _plain(k, r[k]) for k in ROBOT_FIELDS} for r in rows]

    async def list_robots(
        self, *, limit: int, after: Sequence[str] | str | None = None,
        orgs: Collection[str] | None = None, org: str | None = None,
        gateway: str | None = None, status: str | None = None,
    ) -> Page[dict[str, Any]]:
        """One keyset page of robots by (sn, org) and the key to resume after, or None on
        the last page. ``orgs`` None: every org; else only those. ``after`` is the last
        page's key ``[sn, org]`` (a bare sn, as older cursors hold, resumes after it)."""
        await self._ready()
        d = self.dialect
        q = Where(d).orgs(orgs).equal("org_id", org).equal("gateway_id", gateway) \
            .equal("status", status)
        if q.nothing:
            return Page([])
        if isinstance(after, str):
            q.add(f"robot_sn > {d.mark}", after)
        else:
            q.after(after, "robot_sn", "org_id")
        rows = await self.backend.fetch(
            f"SELECT {', '.join(ROBOT_FIELDS)} FROM {d.quote(STATE_TABLE)}{q.sql()}"
            f"{q.page('robot_sn, org_id', limit)}", q.args)
        return Page.of(rows, limit, lambda r: [r["robot_sn"], r["org_id"]]).map(
            lambda r: {k: _plain(k, r[k]) for k in ROBOT_FIELDS})

    def _robot(self, sn: str, org: str | None) -> Where:
        return Where(self.dialect).equal("org_id", org).equal("robot_sn", sn)

    async def list_events(
        self, sn: str, *, limit: int, after: Sequence[Any] | None = None,
        org: str | None = None,
    ) -> Page[dict[str, Any]]:
        """One keyset page of a robot's events (of ``org``'s robot ``sn``), newest first by
        (task_time, ts, event_id), and the key to resume after (None on the last page).
        NULLs sort last, as both databases order them in a descending sort."""
        await self._ready()
        d = self.dialect
        q = self._robot(sn, org)
        if after is not None:
            when_, ts, event_id = after
            tail, tail_args = f"event_id < {d.mark}", [event_id]
            for column, value in (("ts", ts), ("task_time", when_)):
                if value is None:
                    tail = f"({column} IS NULL AND {tail})"
                else:
                    tail = (f"({column} < {d.mark} OR {column} IS NULL"
                            f" OR ({column} = {d.mark} AND {tail}))")
                    tail_args = [value, value, *tail_args]
            q.add(tail, *tail_args)  # NULLs between: not Where.after's plain order
        rows = await self.backend.fetch(
            f"SELECT {', '.join(EVENT_FIELDS)}, task_time AS k_time"
            f" FROM {d.quote(OWN_EVENTS_TABLE)}{q.sql()}"
            f"{q.page('task_time DESC, ts DESC, event_id DESC', limit)}", q.args)

        def key(row: Any) -> list[Any]:
            k_time = row["k_time"]
            if isinstance(k_time, dt.datetime):
                k_time = k_time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            return [k_time, row["ts"], row["event_id"]]

        return Page.of(rows, limit, key).map(
            lambda r: {k: _plain(k, r[k]) for k in EVENT_FIELDS})

    async def list_history(
        self, sn: str, *, since: float, limit: int, after: float | None = None,
        org: str | None = None,
    ) -> Page[dict[str, Any]]:
        """One page of a robot's history points from robot time ``since`` on, oldest
        first, and the key to resume after (None on the last page)."""
        await self._ready()
        d = self.dialect
        q = self._robot(sn, org).add(f"ts >= {d.mark}", since) \
            .after(None if after is None else [after], "ts")
        rows = await self.backend.fetch(
            f"SELECT {', '.join(HISTORY_FIELDS)} FROM {d.quote(HISTORY_TABLE)}{q.sql()}"
            f"{q.page('ts', limit)}", q.args)
        return Page.of([{k: _plain(k, r[k]) for k in HISTORY_FIELDS} for r in rows], limit,
                       lambda item: [item["ts"]])

    async def recent_positions(self, *, since: float, orgs: Collection[str] | None = None,
                               limit: int = 50_000) -> dict[str, list[list[float]]]:
        """Positions recorded since ``since`` (server time), by robot (``"org/sn"``: two
        orgs may share an sn, and neither org nor sn holds a ``/``), oldest first: what
        the floor view's tracks start from. ``orgs`` None: every org."""
        await self._ready()
        d = self.dialect
        q = Where(d).add(f"recorded_at >= {d.mark}", when(since)).add("x IS NOT NULL") \
            .add("y IS NOT NULL").orgs(orgs)
        if q.nothing:
            return {}
        rows = await self.backend.fetch(
            f"SELECT org_id, robot_sn, x, y FROM {d.quote(HISTORY_TABLE)}{q.sql()}"
            f" ORDER BY robot_sn, org_id, ts LIMIT {int(limit)}", q.args)
        tracks: dict[str, list[list[float]]] = {}
        for r in rows:
            tracks.setdefault(f"{r['org_id']}/{r['robot_sn']}", []).append(
                [float(r["x"]), float(r["y"])])
        return tracks

    async def list_tasks(self, sn: str, *, limit: int,
                         org: str | None = None) -> list[dict[str, Any]]:
        """A robot's latest tasks, the one started last first."""
        await self._ready()
        d = self.dialect
        q = self._robot(sn, org)
        rows = await self.backend.fetch(
            f"SELECT {', '.join(TASK_FIELDS)} FROM {d.quote(TASKS_TABLE)}{q.sql()}"
            f" ORDER BY COALESCE(task_time, ts) DESC, task_key DESC LIMIT {int(limit)}", q.args)
        return [{k: _plain(k, r[k]) for k in TASK_FIELDS} for r in rows]

    async def recent_events(self, *, limit: int, orgs: Collection[str] | None = None,
                            ) -> list[dict[str, Any]]:
        """The latest events of every robot (of ``orgs``; None: every org), newest
        received first."""
        await self._ready()
        d = self.dialect
        q = Where(d).orgs(orgs)
        if q.nothing:
            return []
        rows = await self.backend.fetch(
            f"SELECT {', '.join(EVENT_FIELDS)} FROM {d.quote(OWN_EVENTS_TABLE)}{q.sql()}"
            f" ORDER BY upload_time DESC, event_id DESC LIMIT {int(limit)}", q.args)
        return [{k: _plain(k, r[k]) for k in EVENT_FIELDS} for r in rows]

    async def get_robots_of(self, robots: Collection[tuple[str, str]],
                            ) -> list[dict[str, Any]]:
        """Latest state of these ``(org, sn)`` robots (those that reported), by sn then
        org; each found by the primary key (the console reads the
        robots of each tick's batches: by sn alone, the whole table every tick)."""
        await self._ready()
        d = self.dialect
        rows = await self.backend.fetch_keyed(
            lambda n: f"SELECT {', '.join(ROBOT_FIELDS)} FROM {d.quote(STATE_TABLE)} "
                      f"WHERE {d.pairs(('org_id', 'robot_sn'), n)}", sorted(set(robots)))
        out = [{k: _plain(k, r[k]) for k in ROBOT_FIELDS} for r in rows]
        return sorted(out, key=lambda r: (r["robot_sn"], r["org_id"]))

    async def get_robot(self, sn: str, orgs: Collection[str] | None = None,
                        ) -> dict[str, Any] | None:
        """Latest state of robot ``sn`` of one of ``orgs`` (None: any org), or None if it
        never reported there. Two orgs' robots with that sn: the one heard of last."""
        await self._ready()
        d = self.dialect
        q = Where(d).equal("robot_sn", sn).orgs(orgs)
        if q.nothing:
            return None
        rows = await self.backend.fetch(
            f"SELECT {', '.join(ROBOT_FIELDS)} FROM {d.quote(STATE_TABLE)}{q.sql()}"
            f" ORDER BY last_ts DESC, org_id LIMIT 1", q.args)
        return {k: _plain(k, rows[0][k]) for k in ROBOT_FIELDS} if rows else None

    async def get_events(self, sn: str, limit: int = 50,
                         org: str | None = None) -> list[dict[str, Any]]:
        """A robot's events, newest robot time first."""
        items, _ = await self.list_events(sn, limit=max(1, min(int(limit), 10_000)), org=org)
        return items

    async def get_runs(self, limit: int = 100, cursor: tuple[float, str] | None = None,
                       org_id: str | None = None, *, orgs: Sequence[str] | None = None,
                       ) -> Page[dict[str, Any]]:
        """Poll runs, newest first, and the cursor after the last one (None: no more).

        The cursor is the last row's [started_ts, run_key]: keyset paging stays correct
        while new runs arrive.
        """
        await self._ready()
        d = self.dialect
        limit = max(1, min(int(limit), 1000))
        q = Where(d).equal("org_id", org_id).orgs(orgs) \
            .after(cursor, "started_ts", "run_key", descending=True)
        if q.nothing:  # the caller's key covers no org
            return Page([])
        rows = await self.backend.fetch(
            f"SELECT run_key, started_ts, {', '.join(RUN_FIELDS)} FROM {d.quote(RUNS_TABLE)}"
            f"{q.sql()}{q.page('started_ts DESC, run_key DESC', limit)}", q.args)
        return Page.of(rows, limit, lambda r: [float(r["started_ts"] or 0), str(r["run_key"])]) \
            .map(lambda r: {k: _plain(k, r[k]) for k in RUN_FIELDS})

    async def ping(self) -> bool:
        """True when the database answers and the tables are there (for health checks:
        a replica is not ready for traffic before its schema is, since the tables are
        made on first use)."""
        return await self.unreachable() is None

    async def unreachable(self) -> str | None:
        """Why ``ping`` is false, as the store says it (None: it is true). ``check-config
        --connect`` shows it: a secret that cannot be read is not a database that does
        not answer, and the operator fixes a different thing."""
        try:
            await self._ready()
            await self.backend.fetch("SELECT 1 AS ok")
        except (StoreError, ConfigError) as exc:
            return str(exc)
        return None
