"""The store: migrations, batched idempotent writes, dead letters and the read API.

Backend-agnostic: statements come from the Dialect, rows from rows.py, and the
backend runs them. Every write is one transaction that is safe to run again, so the
caller retries a failed batch whole (see ``write_batch``).
"""

from __future__ import annotations

import asyncio
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

from bridge.commands import CommandOutcome
from bridge.errors import StoreError, StoreRejectedError
from callback_server.store.base import Backend, Statement
from callback_server.store.rows import Item, build_rows, key, text, when
from callback_server.store.schema import (
    ALERT_TABLES,
    COMMAND_TABLE,
    COMMANDS,
    DEAD_LETTERS,
    DEAD_TABLE,
    EVENTS,
    HISTORY,
    HISTORY_EVERY_SECONDS,
    HISTORY_FIELDS,
    HISTORY_TABLE,
    LOG,
    LOG_TABLE,
    PRUNABLE,
    ROBOTS,
    RUNS,
    RUNS_TABLE,
    TASK_FIELDS,
    TASKS,
    TASKS_TABLE,
    WATERMARKS,
    TableSpec,
)
from callback_server.store.targets import Targets
from callback_server.store.tasks import task_rows

log = logging.getLogger(__name__)

#: Robots per history statement (a batch holds at most a few hundred robots).
_HISTORY_CHUNK = 500

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
    events: int    # new event rows (first events target)
    robots: int    # robots whose state row was upserted (in every status target)
    skewed: int = 0  # messages whose robot time was too far ahead (ordered by our clock)

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


class SqlStore:
    """Latest robot state, events, the raw message log and dead letters, in SQL.

    An async context manager; connecting happens on first use, so entering it works
    while the database is down. Tables are created (``migrate``) before the first
    write or read if the caller has not done it.
    """

    def __init__(self, backend: Backend, targets: Targets | None = None,
                 *, max_skew: float = 300.0) -> None:
        self.backend = backend
        self.dialect = backend.dialect
        self.targets = targets or Targets()
        self.max_skew = max_skew
        self._migrated = False
        self._migrate_lock = asyncio.Lock()
        self._limits: dict[str, dict[str, int]] = {}
        d = self.dialect
        self._log_sql = d.insert_ignore(LOG_TABLE, LOG.names)
        self._runs_sql = d.insert_ignore(RUNS_TABLE, RUNS.names)
        self._event_sql = [d.insert_ignore(t.qualified, EVENTS.names)
                           for t in self.targets.robot_events]
        # a task's state moves only forward in robot time (ts last: MySQL assigns in order)
        newer = f"{d.new('ts')} >= COALESCE(ts, {d.new('ts')})"
        columns = [c for c in TASKS.names if c not in (*TASKS.key, "ts")] + ["ts"]
        self._task_sql = d.upsert(TASKS_TABLE, TASKS.names, TASKS.key, {
            c: f"CASE WHEN {newer} THEN {d.new(c)} ELSE {c} END" for c in columns})
        robots = self.targets.robot_status[0].qualified
        self._history_sql = functools.lru_cache(maxsize=64)(functools.partial(
            d.history_points, HISTORY_TABLE, robots, HISTORY_EVERY_SECONDS))

    async def __aenter__(self) -> SqlStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self.backend.close()

    # -- schema -------------------------------------------------------------------------
    async def migrate(self) -> list[str]:
        """Create missing databases, tables and columns; idempotent, safe to race.
        Returns what it did, one line per database or table (``callback-server migrate``
        prints them).

        Existing tables keep their columns and types; missing ones are added. A robot
        table that gains its watermark columns gets them seeded from ``last_updated``
        (read as UTC, capped at now) so older messages do not overwrite legacy state.
        StoreError when the database is unreachable or a table lacks the key the
        store writes by.
        """
        async with self._migrate_lock:
            d = self.dialect
            report: list[str] = []
            for name in sorted(await self.backend.missing_databases(self.targets.databases)):
                log.info("creating database %s", name)
                await self.backend.transaction([(d.create_database(name), None)])
                report.append(f"created database {name}")
            limits: dict[str, dict[str, int]] = {"robots": {}, "events": {}, "log": {}}
            plan: list[tuple[str, TableSpec, str | None]] = [
                *((t.qualified, ROBOTS, "robots") for t in self.targets.robot_status),
                *((t.qualified, EVENTS, "events") for t in self.targets.robot_events),
                (LOG_TABLE, LOG, "log"), (DEAD_TABLE, DEAD_LETTERS, None),
                (COMMAND_TABLE, COMMANDS, None), (RUNS_TABLE, RUNS, None),
                (HISTORY_TABLE, HISTORY, None), (TASKS_TABLE, TASKS, None),
                *((name, spec, None) for name, spec in ALERT_TABLES.items()),
            ]
            for table, spec, kind in plan:
                have = await self._ensure(table, spec, report)
                if kind is None:
                    continue
                for column, limit in have.items():
                    if limit:
                        mine = limits[kind].get(column)
                        limits[kind][column] = limit if mine is None else min(mine, limit)
            self._limits = limits
            self._migrated = True
            return report

    async def _ensure(self, table: str, spec: TableSpec,
                      report: list[str]) -> dict[str, int | None]:
        d = self.dialect
        have = await self.backend.columns(table)
        added = []
        created = not have
        if created:
            log.info("creating table %s", table)
            await self.backend.transaction([(d.create_table(table, spec), None)])
            have = await self.backend.columns(table)  # indexes below, as for old tables
        for column in spec.columns:
            if column.name in have:
                continue
            log.info("adding column %s to existing table %s", column.name, table)
            try:
                await self.backend.transaction([(d.add_column(table, column), None)])
            except StoreError:
                have = await self.backend.columns(table)
                if column.name not in have:
                    raise
                continue  # another replica added it first
            added.append(column.name)
        if spec.aged_by:
            await self.backend.transaction([(d.create_index(table, spec.aged_by), None)])
        if spec.unique:
            await self.backend.transaction(
                [(d.create_index(table, spec.unique, unique=True), None)])
        # The console's latest events across robots read the first events target. (SQLite
        # names an attached database's index, not its table: no index on those.)
        if table == self.targets.robot_events[0].qualified and (d.mysql or "." not in table):
            await self.backend.transaction([(d.create_index(table, "upload_time"), None)])
        if spec is ROBOTS:
            await self._seed_watermarks(table, [c for c in added if c in (*WATERMARKS, "last_ts")])
        if created:
            report.append(f"created table {table}")
        elif added:
            report.append(f"table {table} existed; added columns {', '.join(added)}")
        else:
            report.append(f"table {table} existed, up to date")
        if spec.columns[0].kind != "serial":
            keys = await self.backend.unique_keys(table)
            if frozenset(spec.key) not in keys:
                cols = ", ".join(spec.key)
                raise StoreError(
                    f"table {table} has no primary key or unique index on ({cols}), so "
                    f"writes could not be idempotent; add one "
                    f"(ALTER TABLE {table} ADD PRIMARY KEY ({cols})) and restart"
                )
        return await self.backend.columns(table)

    async def _seed_watermarks(self, table: str, columns: list[str]) -> None:
        if not columns:
            return
        d = self.dialect
        value = d.least(d.epoch("last_updated"), d.mark)
        sets = ", ".join(f"{c} = {value}" for c in columns)
        sql = (f"UPDATE {d.quote(table)} SET {sets}"
               f" WHERE {columns[0]} IS NULL AND last_updated IS NOT NULL")
        try:
            await self.backend.transaction([(sql, [(time.time(),) * len(columns)])])
        except StoreError as exc:  # e.g. a last_updated that is not a datetime
            log.warning("could not seed watermarks of %s from last_updated: %s", table, exc)

    async def _ready(self) -> None:
        if not self._migrated:
            await self.migrate()

    async def ready(self) -> None:
        """Migrate first if nobody has: for parts that run their own SQL (alerts)."""
        await self._ready()

    # -- writes -------------------------------------------------------------------------
    async def write_batch(self, items: Sequence[Item]) -> BatchResult:
        """Write a batch of messages in one transaction; safe to retry whole.

        ``items`` are ``(topic, envelope)`` pairs (the topic goes to the raw log) or
        bare envelopes (topic rebuilt without prefix). Per batch: every envelope into
        the raw log unless its id is there; every event into each events target unless
        ``(robot_sn, event_id)`` is there; one upsert per robot into each status target
        carrying the batch's newest value of each state group, applied only where it
        is not older than the stored one. So any order, split or repetition of the
        same messages leaves the same tables. StoreError if nothing was committed.
        """
        if not items:
            return BatchResult(0, 0, 0, 0)
        await self._ready()
        now = time.time()
        try:
            rows = build_rows(items, now=now, limits=self._limits, max_skew=self.max_skew)
        except Exception as exc:  # any fault of the data, not of the database
            # Retrying cannot help: the batcher bisects to the message and dead-letters it.
            raise StoreRejectedError(f"cannot build rows: {type(exc).__name__}: {exc}") \
                from exc
        horizon = now + self.max_skew
        statements: list[Statement] = [(self._log_sql, rows.log)]
        statements += [(sql, rows.events) for sql in self._event_sql]
        statements += [(self.dialect.robot_upsert(t.qualified, horizon), rows.robots)
                       for t in self.targets.robot_status]
        statements.append((self._runs_sql, rows.runs))
        stamp = when(now)
        sns = [r[0] for r in rows.robots]
        for i in range(0, len(sns), _HISTORY_CHUNK):
            chunk = sns[i:i + _HISTORY_CHUNK]
            statements.append((self._history_sql(len(chunk)), [(stamp, *chunk, horizon)]))
        statements.append((self._task_sql, task_rows(items, now)))
        counts = await self.backend.transaction(statements)
        return BatchResult(messages=len(items), logged=counts[0], events=counts[1],
                           robots=len(rows.robots), skewed=rows.skewed)

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
               text(outcome.org_id, sizes["org_id"]), text(outcome.device_id, sizes["device_id"]),
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

    # -- reads --------------------------------------------------------------------------
    async def get_robots(self) -> list[dict[str, Any]]:
        """Latest state of every robot (first status target), ordered by sn."""
        await self._ready()
        table = self.dialect.quote(self.targets.robot_status[0].qualified)
        rows = await self.backend.fetch(
            f"SELECT {', '.join(ROBOT_FIELDS)} FROM {table} ORDER BY robot_sn")
        return [{k: _plain(k, r[k]) for k in ROBOT_FIELDS} for r in rows]

    async def list_robots(
        self, *, limit: int, after: str | None = None, orgs: Collection[str] | None = None,
        org: str | None = None, gateway: str | None = None, status: str | None = None,
    ) -> tuple[list[dict[str, Any]], list[Any] | None]:
        """One keyset page of robots by sn (first status target) and the key to resume
        after, or None on the last page. ``orgs`` None: every org; else only those."""
        await self._ready()
        d = self.dialect
        table = d.quote(self.targets.robot_status[0].qualified)
        where, args = [], []
        if after is not None:
            where.append(f"robot_sn > {d.mark}")
            args.append(after)
        if orgs is not None:
            if not orgs:
                return [], None
            where.append(f"org_id IN ({d.marks(len(orgs))})")
            args.extend(sorted(orgs))
        for column, value in (("org_id", org), ("gateway_id", gateway), ("status", status)):
            if value is not None:
                where.append(f"{column} = {d.mark}")
                args.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self.backend.fetch(
            f"SELECT {', '.join(ROBOT_FIELDS)} FROM {table}{clause}"
            f" ORDER BY robot_sn LIMIT {int(limit) + 1}", args)
        items = [{k: _plain(k, r[k]) for k in ROBOT_FIELDS} for r in rows[:limit]]
        more = len(rows) > limit
        return items, [rows[limit - 1]["robot_sn"]] if more and items else None

    async def list_events(
        self, sn: str, *, limit: int, after: Sequence[Any] | None = None,
    ) -> tuple[list[dict[str, Any]], list[Any] | None]:
        """One keyset page of a robot's events, newest first by (task_time, ts, event_id),
        and the key to resume after (None on the last page). NULLs sort last, as both
        databases order them in a descending sort."""
        await self._ready()
        d = self.dialect
        table = d.quote(self.targets.robot_events[0].qualified)
        where, args = f"robot_sn = {d.mark}", [sn]
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
            where += f" AND {tail}"
            args += tail_args
        rows = await self.backend.fetch(
            f"SELECT {', '.join(EVENT_FIELDS)}, task_time AS k_time FROM {table} WHERE {where}"
            f" ORDER BY task_time DESC, ts DESC, event_id DESC LIMIT {int(limit) + 1}", args)
        items = [{k: _plain(k, r[k]) for k in EVENT_FIELDS} for r in rows[:limit]]
        if len(rows) <= limit or not items:
            return items, None
        last = rows[limit - 1]
        k_time = last["k_time"]
        if isinstance(k_time, dt.datetime):
            k_time = k_time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        return items, [k_time, last["ts"], last["event_id"]]

    async def list_history(
        self, sn: str, *, since: float, limit: int, after: float | None = None,
    ) -> tuple[list[dict[str, Any]], list[Any] | None]:
        """One page of a robot's history points from robot time ``since`` on, oldest
        first, and the key to resume after (None on the last page)."""
        await self._ready()
        d = self.dialect
        where, args = f"robot_sn = {d.mark} AND ts >= {d.mark}", [sn, since]
        if after is not None:
            where += f" AND ts > {d.mark}"
            args.append(after)
        rows = await self.backend.fetch(
            f"SELECT {', '.join(HISTORY_FIELDS)} FROM {d.quote(HISTORY_TABLE)} WHERE {where}"
            f" ORDER BY ts LIMIT {int(limit) + 1}", args)
        items = [{k: _plain(k, r[k]) for k in HISTORY_FIELDS} for r in rows[:limit]]
        return items, [items[-1]["ts"]] if len(rows) > limit and items else None

    async def recent_positions(self, *, since: float, orgs: Collection[str] | None = None,
                               limit: int = 50_000) -> dict[str, list[list[float]]]:
        """Positions recorded since ``since`` (server time), by robot, oldest first: what
        the floor view's tracks start from. ``orgs`` None: every org."""
        await self._ready()
        d = self.dialect
        where, args = [f"recorded_at >= {d.mark}", "x IS NOT NULL", "y IS NOT NULL"], \
            [when(since)]
        if orgs is not None:
            if not orgs:
                return {}
            where.append(f"org_id IN ({d.marks(len(orgs))})")
            args.extend(sorted(orgs))
        rows = await self.backend.fetch(
            f"SELECT robot_sn, x, y FROM {d.quote(HISTORY_TABLE)} WHERE {' AND '.join(where)}"
            f" ORDER BY robot_sn, ts LIMIT {int(limit)}", args)
        tracks: dict[str, list[list[float]]] = {}
        for r in rows:
            tracks.setdefault(str(r["robot_sn"]), []).append([float(r["x"]), float(r["y"])])
        return tracks

    async def list_tasks(self, sn: str, *, limit: int) -> list[dict[str, Any]]:
        """A robot's latest tasks, the one started last first."""
        await self._ready()
        d = self.dialect
        rows = await self.backend.fetch(
            f"SELECT {', '.join(TASK_FIELDS)} FROM {d.quote(TASKS_TABLE)}"
            f" WHERE robot_sn = {d.mark} ORDER BY COALESCE(task_time, ts) DESC,"
            f" task_key DESC LIMIT {int(limit)}", (sn,))
        return [{k: _plain(k, r[k]) for k in TASK_FIELDS} for r in rows]

    async def recent_events(self, *, limit: int, orgs: Collection[str] | None = None,
                            ) -> list[dict[str, Any]]:
        """The latest events of every robot (of ``orgs``; None: every org), newest
        received first (first events target)."""
        await self._ready()
        d = self.dialect
        table = d.quote(self.targets.robot_events[0].qualified)
        where, args = "", []
        if orgs is not None:
            if not orgs:
                return []
            where = f" WHERE org_id IN ({d.marks(len(orgs))})"
            args = sorted(orgs)
        rows = await self.backend.fetch(
            f"SELECT {', '.join(EVENT_FIELDS)} FROM {table}{where}"
            f" ORDER BY upload_time DESC, event_id DESC LIMIT {int(limit)}", args)
        return [{k: _plain(k, r[k]) for k in EVENT_FIELDS} for r in rows]

    async def get_robots_by_sn(self, sns: Collection[str]) -> list[dict[str, Any]]:
        """Latest state of these robots (those that reported), by sn; 500 a query at most."""
        await self._ready()
        d = self.dialect
        table = d.quote(self.targets.robot_status[0].qualified)
        ordered = sorted(set(sns))
        out: list[dict[str, Any]] = []
        for i in range(0, len(ordered), 500):
            chunk = ordered[i:i + 500]
            rows = await self.backend.fetch(
                f"SELECT {', '.join(ROBOT_FIELDS)} FROM {table} "
                f"WHERE robot_sn IN ({d.marks(len(chunk))}) ORDER BY robot_sn", chunk)
            out += [{k: _plain(k, r[k]) for k in ROBOT_FIELDS} for r in rows]
        return out

    async def get_robot(self, sn: str) -> dict[str, Any] | None:
        """Latest state of one robot, or None if it never reported."""
        await self._ready()
        d = self.dialect
        table = d.quote(self.targets.robot_status[0].qualified)
        rows = await self.backend.fetch(
            f"SELECT {', '.join(ROBOT_FIELDS)} FROM {table} WHERE robot_sn = {d.mark}", (sn,))
        return {k: _plain(k, rows[0][k]) for k in ROBOT_FIELDS} if rows else None

    async def get_events(self, sn: str, limit: int = 50) -> list[dict[str, Any]]:
        """A robot's events, newest robot time first (first events target)."""
        await self._ready()
        d = self.dialect
        table = d.quote(self.targets.robot_events[0].qualified)
        limit = max(1, min(int(limit), 10_000))
        rows = await self.backend.fetch(
            f"SELECT {', '.join(EVENT_FIELDS)} FROM {table} WHERE robot_sn = {d.mark}"
            f" ORDER BY task_time DESC, ts DESC, event_id DESC LIMIT {limit}",
            (sn,),
        )
        return [{k: _plain(k, r[k]) for k in EVENT_FIELDS} for r in rows]

    async def get_runs(self, limit: int = 100, cursor: tuple[float, str] | None = None,
                       org_id: str | None = None, *, orgs: Sequence[str] | None = None,
                       ) -> tuple[list[dict[str, Any]], tuple[float, str] | None]:
        """Poll runs, newest first, and the cursor after the last one (None: no more).

        The cursor is the last row's (started_ts, run_key): keyset paging stays correct
        while new runs arrive.
        """
        await self._ready()
        d = self.dialect
        limit = max(1, min(int(limit), 1000))
        where: list[str] = []
        args: list[Any] = []
        if org_id is not None:
            where.append(f"org_id = {d.mark}")
            args.append(org_id)
        if orgs is not None:  # the caller's key covers only these
            if not orgs:
                return [], None
            where.append(f"org_id IN ({', '.join([d.mark] * len(orgs))})")
            args += list(orgs)
        if cursor is not None:
            where.append(f"(started_ts < {d.mark} OR (started_ts = {d.mark} AND "
                         f"run_key < {d.mark}))")
            args += [cursor[0], cursor[0], cursor[1]]
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self.backend.fetch(
            f"SELECT run_key, started_ts, {', '.join(RUN_FIELDS)} FROM {d.quote(RUNS_TABLE)}"
            f"{clause} ORDER BY started_ts DESC, run_key DESC LIMIT {limit + 1}", args)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [{k: _plain(k, r[k]) for k in RUN_FIELDS} for r in rows]
        after = (float(rows[-1]["started_ts"] or 0), str(rows[-1]["run_key"])) \
            if more and rows else None
        return items, after

    async def ping(self) -> bool:
        """True when the database answers a trivial query (for health checks)."""
        try:
            await self.backend.fetch("SELECT 1 AS ok")
        except StoreError:
            return False
        return True
