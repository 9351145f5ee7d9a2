"""``migrate``: create and upgrade the product's own tables; describe the targets.

What the product owns it creates, extends and re-keys; ``store_tables`` records it. A
``database_config.yaml`` target it did not create is only read (its columns, types and
keys, for the projection) and never altered, with one exception a DBA asks for:
``--drop-added-columns`` removes the columns an earlier version added to it.

Upgrading from a version that kept its bookkeeping on the targets (a target holding
columns like ``last_ts`` or ``org_id``): the target is taken as that version's table,
its rows are copied into ``robot_state`` / ``robot_events`` under their org, and reads
use only the own tables from then on. Own tables keyed by sn alone (history, tasks,
commands, the log, the alert watch) are rebuilt with ``(org_id, ...)`` keys, rows kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bridge.errors import StoreError
from callback_server.store.base import Backend, ColumnInfo, Statement
from callback_server.store.dialect import Dialect
from callback_server.store.projection import Kind, Projection
from callback_server.store.rows import when
from callback_server.store.schema import (
    ALERT_TABLES,
    BOOKKEEPING,
    CLAIMS,
    CLAIMS_TABLE,
    COMMAND_TABLE,
    COMMANDS,
    DEAD_LETTERS,
    DEAD_TABLE,
    EVENTS,
    HISTORY,
    HISTORY_TABLE,
    LOG,
    LOG_TABLE,
    OWN_EVENTS,
    OWN_EVENTS_TABLE,
    OWNERSHIP,
    OWNERSHIP_TABLE,
    ROBOTS,
    RUNS,
    RUNS_TABLE,
    STATE,
    STATE_TABLE,
    TASKS,
    TASKS_TABLE,
    WATERMARKS,
    WEBHOOK_TABLES,
    TableSpec,
)
from callback_server.store.targets import Table, Targets

log = logging.getLogger(__name__)

#: The product's own tables, in creation order.
OWN: dict[str, TableSpec] = {
    OWNERSHIP_TABLE: OWNERSHIP, STATE_TABLE: STATE, OWN_EVENTS_TABLE: OWN_EVENTS,
    CLAIMS_TABLE: CLAIMS, LOG_TABLE: LOG, DEAD_TABLE: DEAD_LETTERS, COMMAND_TABLE: COMMANDS,
    RUNS_TABLE: RUNS, HISTORY_TABLE: HISTORY, TASKS_TABLE: TASKS, **ALERT_TABLES,
    **WEBHOOK_TABLES,
}


@dataclass
class Outcome:
    """What ``migrate`` found and did (or, planning, would do)."""

    lines: list[str] = field(default_factory=list)
    projections: list[Projection] = field(default_factory=list)


class Migration:
    """One run of ``migrate`` over a backend; ``apply=False`` only plans."""

    def __init__(self, backend: Backend, targets: Targets, *, apply: bool = True,
                 drop_added: bool = False) -> None:
        self.backend = backend
        self.d: Dialect = backend.dialect
        self.targets = targets
        self.apply = apply
        self.drop_added = drop_added
        self.out = Outcome()
        self.owned: dict[str, str] = {}

    def say(self, line: str) -> None:
        self.out.lines.append(line)

    async def run(self) -> Outcome:
        d = self.d
        for t in (*self.targets.robot_status, *self.targets.robot_events):
            if t.name in OWN and t.database is None:
                raise StoreError(f"database_config.yaml names {t.qualified}, a table this "
                                 f"product keeps for itself; name another table")
        for name in sorted(await self.backend.missing_databases(self.targets.databases)):
            await self._do([(d.create_database(name), None)], f"create database {name}")
        if await self.backend.column_info(OWNERSHIP_TABLE):
            rows = await self.backend.fetch(
                f"SELECT table_name, how FROM {d.quote(OWNERSHIP_TABLE)}")
            self.owned = {str(r["table_name"]): str(r["how"]) for r in rows}
        for table, spec in OWN.items():
            await self._rekey(table, spec)
        for table, spec in OWN.items():
            await self._own(table, spec)
        for kind, tables in (("robots", self.targets.robot_status),
                             ("events", self.targets.robot_events)):
            for i, t in enumerate(tables):
                await self._target(t, kind, first=(i == 0))  # type: ignore[arg-type]
        names = [p.name for p in self.out.projections]
        owned = [*OWN, *(n for n in names if n in self.owned)]
        self.say(f"owns: {', '.join(owned)}; only writes: "
                 f"{', '.join(n for n in names if n not in self.owned) or 'nothing'}")
        return self.out

    async def _do(self, statements: Sequence[Statement], what: str,
                  done: str | None = None) -> None:
        """Run ``statements`` (planning: only say ``would {what}``)."""
        if not self.apply:
            self.say(f"would {what}")
            return
        log.info("migrate: %s", what)
        await self.backend.transaction(statements)
        self.say(done or f"{what}: done")

    async def _record(self, table: str, how: str) -> None:
        if self.owned.get(table) == how or not self.apply:
            self.owned[table] = how
            return
        sql = self.d.upsert(OWNERSHIP_TABLE, OWNERSHIP.names, OWNERSHIP.key,
                            {"how": self.d.new("how"), "recorded_at": self.d.new("recorded_at")})
        await self.backend.transaction([(sql, [(table, how, when(time.time()))])])
        self.owned[table] = how

    # -- own tables -------------------------------------------------------------------------
    async def _rekey(self, table: str, spec: TableSpec) -> None:
        """An own table of an earlier version keyed without the org: rebuilt, rows kept."""
        have = await self.backend.column_info(table)
        if not have or spec.columns[0].kind == "serial":
            return
        if frozenset(spec.key) in await self.backend.unique_keys(table):
            return
        d, tmp = self.d, f"{table}__rekey"
        cols = [c for c in spec.names if c in have]
        values = [f"COALESCE({c}, '')" if c in spec.key else c for c in cols]
        ignore = "INSERT IGNORE" if d.mysql else "INSERT OR IGNORE"
        await self._do([
            (f"DROP TABLE IF EXISTS {d.quote(tmp)}", None),
            (d.create_table(tmp, spec), None),
            (f"{ignore} INTO {d.quote(tmp)} ({', '.join(cols)})"
             f" SELECT {', '.join(values)} FROM {d.quote(table)}", None),
            (f"DROP TABLE {d.quote(table)}", None),
            (d.rename(tmp, table), None),
        ], f"re-key table {table} by ({', '.join(spec.key)}), keeping its rows",
            f"re-keyed table {table} by ({', '.join(spec.key)}), rows kept")

    async def _own(self, table: str, spec: TableSpec) -> None:
        have = await self.backend.column_info(table)
        if not have:
            await self._do([(self.d.create_table(table, spec), None)], f"create table {table}",
                           f"created table {table}")
            if self.apply:
                await self._record(table, "created")
        else:
            changed = await self._extend(table, spec, have)
            changed += await self._widen(table, spec, have)
            if not changed:
                self.say(f"table {table} existed, up to date")
            await self._record(table, self.owned.get(table, "adopted"))
        await self._indexes(table, spec)
        await self._check_key(table, spec.key, spec)

    async def _extend(self, table: str, spec: TableSpec, have: dict[str, ColumnInfo]) -> int:
        """Add the columns an owned table lacks (nullable: old rows have no value); how
        many it lacked."""
        missing = 0
        for column in spec.columns:
            if column.name in have:
                continue
            missing += 1
            if not self.apply:
                self.say(f"would add column {column.name} to {table} (owned)")
                continue
            try:
                await self.backend.transaction([(self.d.add_column(table, column), None)])
            except StoreError:
                if column.name not in await self.backend.columns(table):
                    raise
                continue  # another replica added it first
            self.say(f"table {table}: added column {column.name}")
        return missing

    async def _widen(self, table: str, spec: TableSpec, have: dict[str, ColumnInfo]) -> int:
        """Widen the string columns an owned table declares narrower than this version
        (robot_sn was 64 characters before it took every sn the product accepts); rows
        are kept. Only MySQL enforces a width: SQLite's own columns are TEXT. How many."""
        if not self.d.mysql:
            return 0
        narrow = [c for c in spec.columns if c.kind in ("key", "str") and c.name in have
                  and (n := have[c.name].chars) is not None and n < c.size]
        for column in narrow:
            was = have[column.name].chars
            await self._do([(self.d.widen_column(table, column, key=column.name in spec.key),
                             None)],
                           f"widen {table}.{column.name} from {was} to {column.size} characters",
                           f"table {table}: widened {column.name} from {was} to "
                           f"{column.size} characters, rows kept")
        return len(narrow)

    async def _indexes(self, table: str, spec: TableSpec) -> None:
        if not self.apply:
            return
        d = self.d
        if spec.aged_by:
            await self.backend.transaction([(d.create_index(table, spec.aged_by), None)])
        if spec.unique:
            await self.backend.transaction(
                [(d.create_index(table, spec.unique, unique=True), None)])
        if spec is OWN_EVENTS:  # the console's latest events across robots
            await self.backend.transaction([(d.create_index(table, "upload_time"), None)])

    async def _check_key(self, table: str, key: Sequence[str], spec: TableSpec | None) -> None:
        if not self.apply or (spec is not None and spec.columns[0].kind == "serial"):
            return
        if frozenset(key) not in await self.backend.unique_keys(table):
            raise StoreError(
                f"table {table} has no primary key or unique index on ({', '.join(key)}), so "
                f"writes to it could not be idempotent; its owner needs to add one")

    # -- targets ------------------------------------------------------------------------------
    async def _target(self, t: Table, kind: Kind, *, first: bool) -> None:
        name = t.qualified
        spec = ROBOTS if kind == "robots" else EVENTS
        role = "robot_status" if kind == "robots" else "robot_events"
        have = await self.backend.column_info(name)
        if not have:
            self.say(f"target {name} ({role}): does not exist; the product makes it and owns "
                     f"it, in its own shape ({', '.join(spec.names)})")
            await self._do([(self.d.create_table(name, spec), None)], f"create table {name}",
                           f"created table {name}")
            if not self.apply:
                return
            await self._record(name, "created")
            have = await self.backend.column_info(name)
        elif self.owned.get(name) == "created":
            self.say(f"target {name} ({role}): owned (made by this product)")
            await self._extend(name, spec, have)
            await self._widen(name, spec, have)
            have = await self.backend.column_info(name)
        else:
            added = sorted(c for c in have if c in BOOKKEEPING and c in spec.names)
            if added:
                await self._adopt(name, kind, have)
                self.say(f"target {name} ({role}): columns an earlier version of this product "
                         f"added: {', '.join(added)}; reads no longer use them"
                         + ("" if self.drop_added else
                            " (`callback-server migrate --drop-added-columns` removes them)"))
                if self.drop_added:
                    await self._do([(self.d.drop_column(name, c), None) for c in added],
                                   f"drop columns {', '.join(added)} from {name}")
                    if self.apply:
                        await self.backend.transaction([(
                            f"DELETE FROM {self.d.quote(OWNERSHIP_TABLE)} WHERE table_name ="
                            f" {self.d.mark}", [(name,)])])
                        self.owned.pop(name, None)
                        have = await self.backend.column_info(name)
            self.say(f"target {name} ({role}): not owned; written only, never altered")
        key = ("robot_sn",) if kind == "robots" else ("robot_sn", "event_id")
        await self._check_key(name, key, None)
        p = Projection.of(t, kind, self.d, have, owned=name in self.owned)
        self.say(f"target {name} ({role}): {p.describe()}")
        if first and kind == "events" and self.apply and name in self.owned and \
                (self.d.mysql or "." not in name):
            await self.backend.transaction([(self.d.create_index(name, "upload_time"), None)])
        self.out.projections.append(p)

    async def _adopt(self, name: str, kind: Kind, have: dict[str, ColumnInfo]) -> None:
        """Copy an earlier version's bookkeeping from target ``name`` into the own table."""
        if name in self.owned:
            return  # copied when it was adopted
        d = self.d
        own, spec = (STATE_TABLE, STATE) if kind == "robots" else (OWN_EVENTS_TABLE, OWN_EVENTS)
        cols, values = [], []
        for c in spec.names:
            if c == "org_id":
                cols.append(c)
                values.append("COALESCE(org_id, '')" if c in have else "''")
            elif c in have:
                cols.append(c)
                info = have[c]
                is_time = spec.column(c).kind == "time"
                values.append(d.from_epoch(c) if is_time and info.family != "datetime" else c)
        ignore = "INSERT IGNORE" if d.mysql else "INSERT OR IGNORE"
        statements: list[Statement] = [
            (f"{ignore} INTO {d.quote(own)} ({', '.join(cols)})"
             f" SELECT {', '.join(values)} FROM {d.quote(name)}", None)]
        if kind == "robots":
            # rows without robot-time watermarks: their last_updated orders them, capped at now
            value = d.least(d.epoch("last_updated"), f"{time.time():.3f}")
            sets = ", ".join(f"{c} = COALESCE({c}, {value})" for c in (*WATERMARKS, "last_ts"))
            statements.append((f"UPDATE {d.quote(own)} SET {sets}"
                               f" WHERE last_ts IS NULL AND last_updated IS NOT NULL", None))
        await self._do(statements, f"copy the bookkeeping of {name} into {own}")
        await self._record(name, "adopted")
