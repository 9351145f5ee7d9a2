"""Database connections: aiomysql for MySQL/MariaDB, sqlite3 on one thread for SQLite.

Both run a list of ``executemany`` statements as one transaction and translate their
library's errors to StoreError here, once. Neither connects at construction: the
server must start (degraded) while the database is down.
"""

from __future__ import annotations

import abc
import asyncio
import sqlite3
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomysql
import pymysql

from bridge.errors import ConfigError, StoreError
from callback_server.store.schema import Dialect

Statement = tuple[str, Sequence[Sequence[Any]]]

# INSERT IGNORE of a redelivered row is the point, not a problem worth a warning each.
warnings.filterwarnings("ignore", message="Duplicate entry", category=pymysql.Warning)


class Backend(abc.ABC):
    dialect: Dialect

    @abc.abstractmethod
    async def transaction(self, statements: Sequence[Statement]) -> None:
        """Run every statement (executemany) in one transaction, then commit."""

    @abc.abstractmethod
    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def columns(self, table: str) -> set[str]:
        """Column names of ``table`` (``db.table`` allowed); empty if it does not exist."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class MysqlBackend(Backend):
    """A small aiomysql pool, dropped and rebuilt after any connection error."""

    dialect = Dialect("mysql")

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        parts = urlsplit(url)
        database = parts.path.lstrip("/")
        if not parts.hostname or not database:
            raise ConfigError(f"DATABASE_URL needs a host and a database: {url!r}")
        self.params: dict[str, Any] = {
            "host": parts.hostname,
            "port": parts.port or 3306,
            "user": unquote(parts.username or "root"),
            "password": unquote(parts.password or ""),
            "db": database,
            "charset": "utf8mb4",
            "connect_timeout": 3,
            "autocommit": False,
        }
        self.database = database
        self.pool_size = pool_size
        self._pool: aiomysql.Pool | None = None
        self._lock = asyncio.Lock()

    def _describe(self) -> str:
        return f"mysql://{self.params['host']}:{self.params['port']}/{self.database}"

    async def _get_pool(self) -> aiomysql.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await aiomysql.create_pool(
                    minsize=1, maxsize=self.pool_size, pool_recycle=300, **self.params
                )
            return self._pool

    async def _reset(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            await pool.wait_closed()

    async def _run(self, fn: Any) -> Any:
        try:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                try:
                    return await fn(conn)
                except BaseException:
                    await conn.ensure_closed()  # never hand a half-done transaction back
                    raise
        except (pymysql.err.Error, OSError, TimeoutError) as exc:
            await self._reset()
            raise StoreError(f"{self._describe()}: {exc}") from exc

    async def transaction(self, statements: Sequence[Statement]) -> None:
        async def run(conn: aiomysql.Connection) -> None:
            async with conn.cursor() as cur:
                for sql, rows in statements:
                    if rows:
                        await cur.executemany(sql, rows)
            await conn.commit()

        await self._run(run)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        async def run(conn: aiomysql.Connection) -> list[dict[str, Any]]:
            async with conn.cursor(aiomysql.DictCursor) as cur:
                await cur.execute(sql, tuple(args))
                rows = list(await cur.fetchall())
            await conn.commit()  # end the read snapshot so the next read sees new rows
            return rows

        result: list[dict[str, Any]] = await self._run(run)
        return result

    async def columns(self, table: str) -> set[str]:
        database, _, name = table.rpartition(".")
        rows = await self.fetch(
            "SELECT COLUMN_NAME AS c FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (database or self.database, name),
        )
        return {str(r["c"]) for r in rows}

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            await pool.wait_closed()


class SqliteBackend(Backend):
    """One connection used from one thread; other databases are ATTACHed beside it."""

    dialect = Dialect("sqlite")

    def __init__(self, url: str, attach: set[str] | None = None) -> None:
        path = url[len("sqlite:///"):]
        if not path:
            raise ConfigError(f"sqlite URL needs a path: {url!r}")
        self.path = Path(path)
        self.attach = attach or set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # we ack the broker after COMMIT
            conn.execute("PRAGMA busy_timeout=5000")
            for name in sorted(self.attach):
                # names are checked identifiers (targets.py); the file sits beside ours
                target = str(self.path.parent / f"{name}.db")
                conn.execute(f"ATTACH DATABASE ? AS {name}", (target,))
            self._conn = conn
        return self._conn

    async def _call(self, fn: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    async def transaction(self, statements: Sequence[Statement]) -> None:
        def run() -> None:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    if rows:
                        conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._call(run)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            cur = self._connection().execute(sql, tuple(args))
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        result: list[dict[str, Any]] = await self._call(run)
        return result

    async def columns(self, table: str) -> set[str]:
        database, _, name = table.rpartition(".")
        pragma = f"PRAGMA {database + '.' if database else ''}table_info({name})"
        return {str(r["name"]) for r in await self.fetch(pragma)}

    async def close(self) -> None:
        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._call(run)
        self._executor.shutdown(wait=True)
