"""SQLite on one dedicated thread; sqlite3 errors become StoreError here.

``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` or ``sqlite:///:memory:``.
One connection, used only from one worker thread (sqlite3 objects must stay on the
thread that made them), in WAL mode with ``synchronous=FULL``: the broker is
acknowledged after COMMIT, so a commit must survive a power cut.

A target ``database`` in database_config.yaml is a file ``{database}.db`` beside the
main file, ATTACHed under that name (``main`` is the URL's file itself).
"""

from __future__ import annotations

import asyncio
import errno
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bridge.errors import ConfigError, StoreError, StoreFullError, StoreRejectedError
from bridge.service.private_files import prepare_sqlite_file
from callback_server.store.base import (
    Backend,
    ColumnInfo,
    Statement,
    family_of,
)
from callback_server.store.dialect import Dialect

T = TypeVar("T")
MEMORY = ":memory:"
_CHARS = re.compile(r"CHAR\s*\(\s*(\d+)\s*\)", re.IGNORECASE)


def _disk_full(exc: sqlite3.Error | OSError) -> bool:
    """SQLite's "database or disk is full", or the file system's ENOSPC."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL


class SqliteBackend(Backend):
    """One connection on one thread; other target databases ATTACHed beside it."""

    dialect = Dialect("sqlite")

    def __init__(self, url: str, attach: set[str] | None = None,
                 busy_timeout_ms: int = 5000) -> None:
        path = url.split("://", 1)[1][1:] if "://" in url else ""
        if not path:
            raise ConfigError("sqlite DATABASE_URL needs a path: sqlite:///path/to/file.db")
        self.path = path
        self.attach = sorted((attach or set()) - {"main", "temp"})
        self.busy_timeout_ms = busy_timeout_ms
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self.path != MEMORY:
            prepare_sqlite_file(Path(self.path))  # 0600 (and so its WAL), dirs 0700
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (sqlite3's implicit
        # transactions would not cover DDL and would start lazily, after the first read).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            self._wal(conn, "main")
            for name in self.attach:
                # names are checked identifiers (targets.py); the file sits beside ours
                target = MEMORY if self.path == MEMORY else str(Path(self.path).parent /
                                                                f"{name}.db")
                if target != MEMORY:
                    prepare_sqlite_file(Path(target))
                conn.execute(f'ATTACH DATABASE ? AS "{name}"', (target,))
                self._wal(conn, name)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _wal(self, conn: sqlite3.Connection, schema: str) -> None:
        """WAL journal and full fsync on commit, for one (attached) database.

        Switching to WAL needs the file to itself and SQLite does not wait for that
        (no busy handler), so a replica opening the same new file at the same moment
        gets "database is locked": retry within the busy timeout. WAL persists, so
        this only races on a brand-new file.
        """
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                conn.execute(f'PRAGMA "{schema}".journal_mode=WAL')
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # on the store's own thread, never the event loop
        conn.execute(f'PRAGMA "{schema}".synchronous=FULL')

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError(f"{self.describe()}: the store is closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: fn(self._connection()))
        except (sqlite3.IntegrityError, sqlite3.DataError) as exc:
            raise StoreRejectedError(f"{self.describe()} refused: {exc}") from exc
        except (sqlite3.Error, OSError) as exc:  # OSError: the directory cannot be made
            if _disk_full(exc):
                raise StoreFullError(f"{self.describe()}: {exc}") from exc
            raise StoreError(f"{self.describe()}: {exc}") from exc

    async def transaction(self, statements: Sequence[Statement]) -> list[int]:
        def run(conn: sqlite3.Connection) -> list[int]:
            counts = []
            # IMMEDIATE takes the write lock up front, so busy_timeout applies to it
            # rather than failing halfway through on a lock upgrade.
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    if rows is None:
                        counts.append(max(conn.execute(sql).rowcount, 0))
                    elif rows:
                        counts.append(max(conn.executemany(sql, rows).rowcount, 0))
                    else:
                        counts.append(0)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return counts

        return await self._call(run)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = conn.execute(sql, tuple(args))
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return await self._call(run)

    async def columns(self, table: str) -> dict[str, int | None]:
        schema, _, name = table.rpartition(".")
        rows = await self.fetch(f'PRAGMA "{schema or "main"}".table_info("{name}")')
        # SQLite enforces no length, but a legacy VARCHAR(n) says what the site expects
        # (and keeps both backends storing the same values).
        limits = {}
        for r in rows:
            declared = _CHARS.search(str(r["type"] or ""))
            limits[str(r["name"])] = int(declared.group(1)) if declared else None
        return limits

    async def column_info(self, table: str) -> dict[str, ColumnInfo]:
        schema, _, name = table.rpartition(".")
        rows = await self.fetch(f'PRAGMA "{schema or "main"}".table_info("{name}")')
        out = {}
        for r in rows:
            declared = str(r["type"] or "")
            chars = _CHARS.search(declared)
            out[str(r["name"])] = ColumnInfo(declared, family_of(declared),
                                             int(chars.group(1)) if chars else None)
        return out

    async def create_statement(self, table: str) -> str | None:
        schema, _, name = table.rpartition(".")
        rows = await self.fetch(
            f'SELECT sql FROM "{schema or "main"}".sqlite_master'
            f" WHERE type = 'table' AND name = ?", (name,))
        return str(rows[0]["sql"]) if rows else None

    async def unique_keys(self, table: str) -> list[frozenset[str]]:
        schema, _, name = table.rpartition(".")
        schema = schema or "main"
        info = await self.fetch(f'PRAGMA "{schema}".table_info("{name}")')
        keys = []
        pk = frozenset(str(r["name"]) for r in info if r["pk"])
        if pk:
            keys.append(pk)
        for index in await self.fetch(f'PRAGMA "{schema}".index_list("{name}")'):
            if index["unique"]:
                cols = await self.fetch(f'PRAGMA "{schema}".index_info("{index["name"]}")')
                keys.append(frozenset(str(c["name"]) for c in cols))
        return keys

    async def missing_databases(self, names: set[str]) -> set[str]:
        return set()  # ATTACH creates the file

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(executor, run)
        executor.shutdown(wait=True)
