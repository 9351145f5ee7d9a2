"""The gateway's own durable records, in the outbox database: poll runs and command ids.

Two small tables beside the outbox's, on their own connection (WAL lets it write
between the outbox writer's group commits; ``busy_timeout`` covers the overlap):

- ``poll_runs``: one row per reconciliation run (its record as JSON), so health and
  ``edge-agent poll --once`` survive a restart.
- ``poll_shops``: per shop, the end of the last window whose fault log was read in
  full: the shop's next backfill starts there (less the overlap). Per shop, because a
  shop that failed (or was added to PUDU_SHOP_IDS later) must not inherit the others'.
- ``command_ids``: durable commands (those that call the Pudu API) by ``messageId``,
  marked before the call and answered from here after: a command redelivered even
  after a restart never calls the API twice.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from bridge.commands import Response
from bridge.errors import OutboxError
from bridge.http import keyset
from bridge.http.paging import Page
from bridge.service.private_files import prepare_sqlite_file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS poll_runs (
    run_id TEXT PRIMARY KEY,
    started REAL NOT NULL,
    ended REAL,
    status TEXT NOT NULL,
    events_through REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS poll_runs_started ON poll_runs (started);
CREATE TABLE IF NOT EXISTS poll_shops (
    shop_id TEXT PRIMARY KEY,
    events_through REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS command_ids (
    message_id TEXT PRIMARY KEY,
    command TEXT NOT NULL,
    started REAL NOT NULL,
    response TEXT
);
"""
#: Run records and command ids kept; older ones are deleted on write.
KEEP_RUNS = 2000
KEEP_COMMANDS = 10_000

#: A durable command found begun but unanswered (the agent died during the call).
INTERRUPTED = ("interrupted by an agent restart while calling the Pudu API; not repeated "
               "(it may or may not have reached the robot)")


class Journal:
    """An async context manager; every call runs on one worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Journal:
        try:
            await asyncio.to_thread(self._open)
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open journal in {self.path}: {exc}") from exc
        return self

    def _open(self) -> None:
        prepare_sqlite_file(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(conn.close)

    async def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self._conn
        if conn is None:
            raise OutboxError("journal is closed")

        def run() -> list[tuple[Any, ...]]:
            return conn.execute(sql, args).fetchall()

        async with self._lock:  # one statement at a time on the shared connection
            try:
                return await asyncio.to_thread(run)
            except sqlite3.Error as exc:
                raise OutboxError(f"journal: {exc}") from exc

    # -- poll runs ------------------------------------------------------------------------
    async def save_run(self, record: dict[str, Any]) -> None:
        await self._run(
            "INSERT OR REPLACE INTO poll_runs"
            " (run_id, started, ended, status, events_through, record)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (record["run_id"], record["started_at"], record.get("ended_at"),
             record["status"], record.get("events_through"), json.dumps(record)))
        await self._run("DELETE FROM poll_runs WHERE run_id NOT IN"
                        " (SELECT run_id FROM poll_runs ORDER BY started DESC LIMIT ?)",
                        (KEEP_RUNS,))

    async def runs(self, limit: int = 20, after: Sequence[Any] | None = None,
                   ) -> Page[dict[str, Any]]:
        """Run records, newest first by (started, run_id), a keyset page at a time, and
        the key to resume after (None on the last page)."""
        where: str = ""
        args: list[Any] = []
        if after is not None:
            term, args = keyset.after(after, ("started", "run_id"), descending=True)
            where = f"WHERE {term}"
        rows = await self._run(f"SELECT record, started, run_id FROM poll_runs {where}"
                               f"{keyset.order_limit('started DESC, run_id DESC', limit)}",
                               tuple(args))
        return Page.of(rows, limit, lambda r: [float(r[1]), str(r[2])]).map(
            lambda r: json.loads(r[0]))

    async def events_through(self, shop_id: str) -> float | None:
        """Where the last window of this shop's fault log read in full ended (its next
        backfill starts there, less the overlap); None if it never was."""
        rows = await self._run("SELECT events_through FROM poll_shops WHERE shop_id = ?",
                               (shop_id,))
        return None if not rows else float(rows[0][0])

    async def advance_events(self, shop_id: str, through: float) -> None:
        """Record that the shop's fault log was read and published up to ``through``."""
        await self._run("INSERT INTO poll_shops (shop_id, events_through) VALUES (?, ?)"
                        " ON CONFLICT (shop_id) DO UPDATE SET events_through ="
                        " MAX(events_through, excluded.events_through)", (shop_id, through))

    # -- command ids ----------------------------------------------------------------------
    async def begin_command(self, message_id: str, command: str) -> Response | None:
        """Mark a command as begun; the earlier answer (or INTERRUPTED) if it was seen."""
        rows = await self._run("SELECT response FROM command_ids WHERE message_id = ?",
                               (message_id,))
        if rows:
            stored = rows[0][0]
            if stored is None:
                return Response(message_id, "error", error=INTERRUPTED)
            return Response.from_json(stored.encode())
        await self._run("INSERT INTO command_ids (message_id, command, started) VALUES (?, ?, ?)",
                        (message_id, command, time.time()))
        await self._run("DELETE FROM command_ids WHERE message_id NOT IN"
                        " (SELECT message_id FROM command_ids ORDER BY started DESC LIMIT ?)",
                        (KEEP_COMMANDS,))
        return None

    async def finish_command(self, response: Response) -> None:
        await self._run("UPDATE command_ids SET response = ? WHERE message_id = ?",
                        (response.to_json().decode(), response.message_id))
