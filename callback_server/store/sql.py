"""The store: batched, idempotent writes of envelopes; the read API; dead letters."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from bridge.commands import CommandOutcome
from bridge.envelope import Envelope
from callback_server.store.backends import Backend, Statement
from callback_server.store.schema import (
    COMMAND_COLUMNS,
    COMMAND_TABLE,
    DEAD_COLUMNS,
    DEAD_TABLE,
    EVENT_COLUMNS,
    LOG_COLUMNS,
    LOG_TABLE,
    ROBOT_COLUMNS,
    STATE_GROUPS,
)
from callback_server.store.targets import Targets

log = logging.getLogger(__name__)

_EVENT_INSERT = [c[0] for c in EVENT_COLUMNS]
_LOG_INSERT = [c[0] for c in LOG_COLUMNS]
_PUBLIC_ROBOT = ("robot_sn", "org_id", "gateway_id", "status", "battery_level", "charge_state",
                 "is_charging", "move_state", "water_level", "sewage_level", "x", "y", "z", "yaw",
                 "last_updated", "last_ts")


def when(ts: float) -> str:
    """Robot/gateway seconds as a DATETIME(3) literal both databases accept (UTC)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def state_groups(env: Envelope) -> dict[str, dict[str, Any]]:
    """Latest-state groups this message carries, from every type that carries state."""
    d = env.data
    found: dict[str, dict[str, Any]] = {}

    def take(group: str, **values: Any) -> None:
        if any(v is not None for v in values.values()):
            found[group] = {c: values.get(c) for c in STATE_GROUPS[group]}

    if env.channel == "status":
        take("status", status=d.get("status"))
    if env.channel in ("status", "power", "event"):
        take("battery", battery_level=d.get("battery_level"))
    if env.channel in ("status", "power"):
        take("charge", charge_state=d.get("charge_state"))
        if d.get("is_charging") is not None:
            take("charging", is_charging=int(bool(d["is_charging"])))
    if env.channel in ("pose", "event") and d.get("x") is not None and d.get("y") is not None:
        take("pose", x=d.get("x"), y=d.get("y"), z=d.get("z"), yaw=d.get("yaw"))
    if env.channel in ("status", "move"):
        take("move", move_state=d.get("move_state"))
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="milliseconds")
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _public(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: _plain(row.get(k)) for k in _PUBLIC_ROBOT}
    if out["is_charging"] is not None:
        out["is_charging"] = bool(out["is_charging"])
    return out


class SqlStore:
    """Writes to every target table; an async context manager."""

    def __init__(self, backend: Backend, targets: Targets | None = None) -> None:
        self.backend = backend
        self.dialect = backend.dialect
        self.targets = targets or Targets()
        self._migrated = False

    async def __aenter__(self) -> SqlStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.backend.close()

    # -- schema -------------------------------------------------------------------------
    async def migrate(self) -> None:
        """Create missing tables (and missing extra columns of existing ones)."""
        d = self.dialect
        plan: list[tuple[str, list[tuple[str, str, str]], tuple[str, ...]]] = []
        plan += [(t.qualified, ROBOT_COLUMNS, ("robot_sn",)) for t in self.targets.robot_status]
        plan += [(t.qualified, EVENT_COLUMNS, ("robot_sn", "event_id"))
                 for t in self.targets.robot_events]
        plan += [(LOG_TABLE, LOG_COLUMNS, ("id",)), (DEAD_TABLE, DEAD_COLUMNS, ("id",)),
                 (COMMAND_TABLE, COMMAND_COLUMNS, ("message_id",))]
        if d.mysql:
            for database in sorted(self.targets.databases):
                await self.backend.transaction(
                    [(f"CREATE DATABASE IF NOT EXISTS {d.quote(database)}", [()])]
                )
        for table, columns, key in plan:
            have = await self.backend.columns(table)
            if not have:
                await self.backend.transaction([(d.create_table(table, columns, key), [()])])
                continue
            missing = [c for c in columns if c[0] not in have]
            for column in missing:
                log.info("adding column %s to existing table %s", column[0], table)
                await self.backend.transaction([(d.add_column(table, column), [()])])
        self._migrated = True

    async def _ready(self) -> None:
        if not self._migrated:
            await self.migrate()

    # -- writes -------------------------------------------------------------------------
    async def write_batch(self, items: Sequence[tuple[str, Envelope]]) -> int:
        """Write ``(topic, envelope)`` pairs in one transaction; safe to retry whole."""
        await self._ready()
        d = self.dialect
        now = when(dt.datetime.now(dt.UTC).timestamp())
        log_rows: list[tuple[Any, ...]] = []
        event_rows: list[tuple[Any, ...]] = []
        # (robot, group) -> newest (ts, order, values, envelope): coalesced per batch
        newest: dict[tuple[str, str], tuple[float, int, dict[str, Any], Envelope]] = {}
        for order, (topic, env) in enumerate(items):
            log_rows.append((env.id, topic, env.type, env.org, env.device, env.channel, env.ts,
                             env.received_at, now, env.to_json().decode()))
            if env.channel == "event" and env.data.get("event_id"):
                data = env.data
                event_rows.append((
                    env.device, str(data["event_id"]), data.get("event_level"),
                    data.get("event_type"), data.get("event_detail"), when(env.ts),
                    when(env.received_at), env.org, env.gateway, env.type, env.ts, env.id,
                ))
            if env.device == env.gateway:
                continue  # shop-level callbacks on the gateway's topic are not robot state
            for group, values in state_groups(env).items():
                key = (env.device, group)
                if key not in newest or (env.ts, order) >= newest[key][:2]:
                    newest[key] = (env.ts, order, values, env)
        statements: list[Statement] = [(d.insert_ignore(LOG_TABLE, _LOG_INSERT), log_rows)]
        for table in self.targets.robot_events:
            statements.append((d.insert_ignore(table.qualified, _EVENT_INSERT), event_rows))
        by_group: dict[str, list[tuple[Any, ...]]] = {}
        for (sn, group), (ts, _, values, env) in newest.items():
            row = (sn, env.org, env.gateway, *(values[c] for c in STATE_GROUPS[group]), ts, ts,
                   when(ts))
            by_group.setdefault(group, []).append(row)
        for table in self.targets.robot_status:
            for group, rows in sorted(by_group.items()):
                statements.append((d.state_upsert(table.qualified, group), rows))
        await self.backend.transaction(statements)
        return len(items)

    async def dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        """Keep a message we could not use, with the reason, instead of looping on it."""
        await self._ready()
        now = when(dt.datetime.now(dt.UTC).timestamp())
        sql = self.dialect.insert(DEAD_TABLE, ["topic", "payload", "reason", "created_at"])
        text = payload.decode("utf-8", errors="backslashreplace")
        await self.backend.transaction([(sql, [(topic[:512], text, reason[:2000], now)])])

    async def record_command(self, outcome: CommandOutcome) -> None:
        """A command, its outcome and round-trip time."""
        await self._ready()
        r = outcome.response
        result = None if r is None else (r.result if r.status == "success" else r.error)
        row = (outcome.command.message_id, outcome.org_id, outcome.device_id,
               outcome.command.command, json.dumps(outcome.command.args),
               "timeout" if r is None else r.status,
               None if result is None else json.dumps(result, default=str),
               when(outcome.sent_at), outcome.rtt_ms)
        sql = self.dialect.insert_ignore(COMMAND_TABLE, [c[0] for c in COMMAND_COLUMNS])
        await self.backend.transaction([(sql, [row])])

    # -- reads --------------------------------------------------------------------------
    async def get_robots(self) -> list[dict[str, Any]]:
        await self._ready()
        table = self.dialect.quote(self.targets.robot_status[0].qualified)
        rows = await self.backend.fetch(f"SELECT * FROM {table} ORDER BY robot_sn")
        return [_public(r) for r in rows]

    async def get_robot(self, sn: str) -> dict[str, Any] | None:
        await self._ready()
        d = self.dialect
        table = d.quote(self.targets.robot_status[0].qualified)
        rows = await self.backend.fetch(f"SELECT * FROM {table} WHERE robot_sn = {d.mark}", (sn,))
        return _public(rows[0]) if rows else None

    async def get_events(self, sn: str, limit: int = 50) -> list[dict[str, Any]]:
        await self._ready()
        d = self.dialect
        table = d.quote(self.targets.robot_events[0].qualified)
        rows = await self.backend.fetch(
            f"SELECT robot_sn, event_id, event_level, event_type, event_detail, task_time,"
            f" upload_time, callback_type, ts FROM {table} WHERE robot_sn = {d.mark}"
            f" ORDER BY ts DESC, event_id LIMIT {int(limit)}",
            (sn,),
        )
        return [{k: _plain(v) for k, v in r.items()} for r in rows]

    async def ping(self) -> bool:
        """True when the database answers."""
        try:
            await self.backend.fetch("SELECT 1 AS ok")
        except Exception:
            return False
        return True
