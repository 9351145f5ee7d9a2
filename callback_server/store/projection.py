"""Writing a ``database_config.yaml`` target as a projection of the product's own tables.

A target (``mnt_robots_management`` / ``mnt_robot_events`` or whatever the file names)
gets, of the columns it has, each value in that column's own type as read at start:
an INT/BIGINT time column epoch seconds, DATETIME/TIMESTAMP a datetime. The values come
from the own tables' merged state (``robot_state``, ``robot_events``) in the batch's
transaction, so never-backwards and idempotency carry over: the projection only ever
copies what the own tables already settled. A key that does not fit the target's
column is refused (``unfit``), never cut: a cut sn would be another robot. Another text
is cut to the column (``cuts``; the store logs it once per column), and a number out of
a DECIMAL column's range is refused naming the target and column (``out_of_range``),
rather than by the database naming neither.

A target is keyed by sn alone, so it is single-tenant: ``target_robots`` records which
org's robot each sn is there (the first to report it); only that org's rows are copied.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from callback_server.store.base import ColumnInfo
from callback_server.store.dialect import Dialect
from callback_server.store.schema import (
    CLAIMS_TABLE,
    OWN_EVENTS,
    OWN_EVENTS_TABLE,
    STATE,
    STATE_TABLE,
)
from callback_server.store.targets import Table

Kind = Literal["robots", "events"]

#: Target time columns -> (own column as epoch seconds, own column as datetime), per kind.
_TIMES: dict[Kind, dict[str, tuple[str, str]]] = {
    "robots": {"last_updated": ("r.last_ts", "r.last_updated")},
    "events": {"task_time": ("s.ts", "s.task_time"),
               "upload_time": ("", "s.upload_time")},  # epoch: dialect.epoch(...)
}
_KEYS: dict[Kind, tuple[str, ...]] = {"robots": ("robot_sn",),
                                      "events": ("robot_sn", "event_id")}
#: ``DECIMAL(p,s)`` / ``NUMERIC(p,s)`` as the database declares it (s defaults to 0).
_DECIMAL = re.compile(r"(?:dec|decimal|numeric|fixed)\s*\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)",
                      re.IGNORECASE)


@dataclass(frozen=True)
class Projection:
    """How one target is written: its columns, their conversions, its statement."""

    table: Table
    kind: Kind
    dialect: Dialect
    columns: dict[str, ColumnInfo]
    owned: bool
    #: the columns written (those the target has and the own table knows), in order
    written: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, table: Table, kind: Kind, dialect: Dialect, columns: dict[str, ColumnInfo],
           owned: bool) -> Projection:
        source = STATE if kind == "robots" else OWN_EVENTS
        # water and sewage levels: no message carries them; the target's values stay
        known = set(source.names) - {"water_level", "sewage_level"}
        written = tuple(c for c in columns if c in known)
        if kind == "robots" and "last_updated" in written:  # the guard reads it: last
            written = (*[c for c in written if c != "last_updated"], "last_updated")
        return cls(table, kind, dialect, columns, owned, written)

    @property
    def name(self) -> str:
        return self.table.qualified

    @property
    def folds_case(self) -> bool:
        """Whether the target's sn compares case-insensitively (MySQL ``*_ci``)."""
        sn = self.columns.get("robot_sn")
        return bool(sn and sn.folds_case)

    def fold(self, sn: str) -> str:
        """The sn as the target tells robots apart (its claim key)."""
        return sn.lower() if self.folds_case else sn

    def limits(self) -> dict[str, int]:
        """Character limits of the target's text columns (non-key values are cut)."""
        return {n: c.chars for n, c in self.columns.items()
                if c.chars and c.family == "text"}

    @functools.cached_property
    def cuts(self) -> dict[str, int]:
        """The written text columns (not keys) narrower than the own table's: a longer
        value is cut to the column's characters."""
        own = {c.name: c.size for c in (STATE if self.kind == "robots" else OWN_EVENTS).columns
               if c.size}
        return {n: limit for n, limit in self.limits().items()
                if n in self.written and n not in _KEYS[self.kind] and limit < own.get(n, 0)}

    @functools.cached_property
    def ranges(self) -> dict[str, tuple[int, int]]:
        """The written DECIMAL columns other than times: ``(digits, scale)`` each."""
        out = {}
        for name in self.written:
            m = _DECIMAL.search(self.columns[name].declared)
            if m and name not in _TIMES[self.kind]:
                out[name] = (int(m.group(1)), int(m.group(2) or 0))
        return out

    def out_of_range(self, column: str, value: float) -> str | None:
        """Why ``value`` cannot be this target's DECIMAL ``column``, or None if it fits
        (MySQL refuses it in strict mode, naming only the column; SQLite would keep it)."""
        shape = self.ranges.get(column)
        if shape is None:
            return None
        digits, scale = shape
        if round(abs(value), scale) < 10 ** (digits - scale):
            return None
        most = f"{10 ** (digits - scale) - 10 ** -scale:.{scale}f}"
        return (f"target {self.name}: {column} {value!r} does not fit the column, "
                f"{self.columns[column].declared} (at most {most} either side of 0)")

    def unfit(self, column: str, value: str) -> str | None:
        """Why ``value`` cannot be this target's ``column`` (a key), or None if it fits."""
        info = self.columns.get(column)
        if info is None or info.chars is None or len(value) <= info.chars:
            return None
        return (f"target {self.name}: {column} {value[:80]!r} has {len(value)} characters, "
                f"the column is {info.declared} (refused, never cut)")

    def describe(self) -> str:
        """One line for ``migrate``: what is written and how each time is converted."""
        times = _TIMES[self.kind]
        notes = []
        for c in self.written:
            if c in times:
                info = self.columns[c]
                how = {"int": "epoch seconds", "datetime": "datetime",
                       "number": "epoch seconds", "text": "UTC text"}[info.family]
                notes.append(f"{c} {info.declared} <- {how}")
        orgs = "every org" if self.table.orgs is None else ", ".join(sorted(self.table.orgs))
        return (f"writes columns {', '.join(self.written)}"
                + (f" ({'; '.join(notes)})" if notes else "") + f"; for {orgs}")

    # -- statements ---------------------------------------------------------------------------
    def _value(self, column: str) -> str:
        d = self.dialect
        alias = "r" if self.kind == "robots" else "s"
        times = _TIMES[self.kind]
        if column not in times:
            return f"{alias}.{column}"
        epoch, stamp = times[column]
        epoch = epoch or d.epoch(stamp)
        family = self.columns[column].family
        if family == "int":
            return f"CAST(FLOOR({epoch}) AS SIGNED)" if d.mysql else f"CAST({epoch} AS INTEGER)"
        if family == "number":
            return epoch
        return stamp

    @functools.cached_property
    def statement(self) -> Callable[[int], str]:
        """The statement for ``count`` keys (params: (org, sn[, event_id]) each)."""
        return functools.lru_cache(maxsize=32)(self._statement)

    def _statement(self, count: int) -> str:
        d = self.dialect
        target = d.quote(self.name)
        alias, own = ("r", STATE_TABLE) if self.kind == "robots" else ("s", OWN_EVENTS_TABLE)
        fold = f"LOWER({alias}.robot_sn)" if self.folds_case else f"{alias}.robot_sn"
        keys = [f"{alias}.org_id", f"{alias}.robot_sn"]
        if self.kind == "events":
            keys.append(f"{alias}.event_id")
        # SQLite: CROSS JOIN keeps the batch's own rows the outer loop, each found by its
        # key; left to choose, it read every claim of the target and tested the batch's
        # keys on each (500 robots among 15,000: 1.07 s a statement, against 42 ms).
        join = "JOIN" if d.mysql else "CROSS JOIN"
        select = (
            f"SELECT {', '.join(self._value(c) for c in self.written)}"
            f" FROM {d.quote(own)} {alias} {join} {d.quote(CLAIMS_TABLE)} k"
            f" ON k.target = '{self.name}' AND k.robot_key = {fold}"
            f" AND k.org_id = {alias}.org_id WHERE ({d.pairs(keys, count)})")
        insert = f"INTO {target} ({', '.join(self.written)}) {select}"
        if self.kind == "events":  # an event is written once; a redelivery is a no-op
            return f"{'INSERT IGNORE' if d.mysql else 'INSERT OR IGNORE'} {insert}"
        sets = [c for c in self.written if c not in _KEYS["robots"]]
        guarded = "last_updated" in self.written
        if d.mysql:
            # Not older than what the target holds (e.g. rows the replaced receiver wrote):
            # each column is taken only then; last_updated is assigned last, as MySQL
            # evaluates the assignments left to right against the updated row.
            cond = (f"VALUES(last_updated) >= COALESCE({target}.last_updated,"
                    f" VALUES(last_updated))")
            parts = [f"{target}.{c} = CASE WHEN {cond} THEN VALUES({c}) ELSE {target}.{c} END"
                     if guarded else f"{target}.{c} = VALUES({c})" for c in sets]
            return f"INSERT {insert} ON DUPLICATE KEY UPDATE {', '.join(parts)}"
        where = (" WHERE excluded.last_updated >= COALESCE(last_updated, excluded.last_updated)"
                 if guarded else "")
        return (f"INSERT {insert} ON CONFLICT(robot_sn) DO UPDATE SET "
                f"{', '.join(f'{c} = excluded.{c}' for c in sets)}{where}")
