"""MySQL/MariaDB through an aiomysql pool; pymysql errors become StoreError here.

``mysql://user:pass@host:3306/db?pool_size=4&timeout=30&ssl_ca=/path/ca.pem``
(``ssl=1`` for TLS with the system CAs); ``?secret_name=...&region_name=...``: the login,
and what else the URL leaves out, from an AWS Secrets Manager secret, read again when
the server refuses the login (error 1045: rotated). Sessions run in UTC, so DATETIME values and
``UNIX_TIMESTAMP`` agree with the epoch seconds the store writes.

Dead connections are never handed out twice: a connection that failed or timed out is
closed instead of returned, and on any connection-level failure the whole pool is
dropped and rebuilt on next use (a restarted server leaves every pooled socket dead).
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import aiomysql
import pymysql
from pymysql.constants import SERVER_STATUS

from bridge.errors import ConfigError, StoreError, StoreRejectedError
from bridge.service.aws_secrets import RefreshingLogin, SecretRef
from callback_server.store.base import Backend, ColumnInfo, Query, Statement, family_of
from callback_server.store.dialect import Dialect

T = TypeVar("T")

# Client-side codes for "the server is not there (any more)": the pool is suspect.
_GONE = {2002, 2003, 2005, 2006, 2013, 2014, 2045, 2055}
_RETRYABLE = {1205, 1213}  # lock wait timeout, deadlock: nothing wrong with the pool


def _connection_lost(exc: BaseException) -> bool:
    if isinstance(exc, OSError | EOFError | TimeoutError | pymysql.err.InterfaceError):
        return True
    code = exc.args[0] if isinstance(exc, pymysql.err.Error) and exc.args else None
    return isinstance(code, int) and code in _GONE


def _login_refused(exc: BaseException) -> bool:
    """MySQL error 1045, "Access denied for user": a rotated password, for one."""
    return (isinstance(exc, pymysql.err.OperationalError) and bool(exc.args)
            and exc.args[0] == 1045)


class _QuietCursor(aiomysql.Cursor):  # type: ignore[misc]
    """Skips aiomysql's SHOW WARNINGS round trip after a statement with warnings: an
    INSERT IGNORE of a redelivered row, or CREATE TABLE IF NOT EXISTS of an existing
    table, warns by design, and each would cost a round trip and a Python warning."""

    async def _show_warnings(self, conn: Any) -> None:
        return None


#: Statements sent together stay under this many characters: each is under the
#: server's packet limit (16 MiB on MariaDB) alone, and a few of them must be too.
_TOGETHER_CHARS = 2**21
#: The most characters of rows one INSERT carries: under MariaDB's default
#: max_allowed_packet (16 MiB; MySQL 8's is 64) even were each a 4-byte character. The
#: rows of a batch of large payloads go as several INSERTs in its transaction, not as
#: one the server refuses (which the batcher could only bisect, a round trip each).
_STATEMENT_CHARS = 2**22 - 2**16


async def _together(cur: aiomysql.Cursor, statements: Sequence[str],
                    read: list[dict[str, Any]]) -> list[int]:
    """Run ``statements`` as one multi-statement query (aiomysql's connections allow it)
    and return each one's affected rows. One round trip instead of one each: a small
    batch's transaction was six, each a socket write and a wake-up of the server's
    thread. The rows of any SELECT among them go to ``read``."""
    affected: list[int] = []
    await cur.execute(";\n".join(statements))
    while True:
        affected.append(max(cur.rowcount, 0))
        if cur.description:
            names = [d[0] for d in cur.description]
            read += (dict(zip(names, row, strict=True)) for row in await cur.fetchall())
        if not await cur.nextset():
            break
    return affected


#: An INSERT whose rows can be folded into one statement (aiomysql's own pattern).
_INSERT_ROWS: re.Pattern[str] = aiomysql.cursors.RE_INSERT_VALUES


def _literal(conn: aiomysql.Connection, value: Any, backslashes: bool) -> str:
    """``value`` as an SQL literal, as the driver writes it (``conn.escape``), but a
    string with two ``str.replace`` calls, skipped when it holds neither a backslash nor
    a quote: the driver's ``str.translate`` and its layers of calls took 0.82 µs a value
    of a typical row, this 0.32, and a batch's statements carry thousands (the store's
    writes: 7 % less of the callback server's CPU a row). In a literal only the quote and
    the backslash are special (a NUL or control character is taken as it is); with
    NO_BACKSLASH_ESCAPES in the session's sql_mode (``backslashes`` false), only the
    quote, doubled."""
    kind = type(value)
    if kind is str:
        text: str = value
        if not backslashes:
            return "'" + text.replace("'", "''") + "'"
        if "\\" in text:
            text = text.replace("\\", "\\\\")
        if "'" in text:
            text = text.replace("'", "\\'")
        return "'" + text + "'"
    if value is None:
        return "NULL"
    if kind is int:
        return str(value)
    if kind is float and math.isfinite(value):
        number = repr(value)
        return number if "e" in number else number + "e0"  # a DOUBLE, as the driver has it
    return str(conn.escape(value))


def _mogrify(conn: aiomysql.Connection, sql: str, args: Sequence[Any]) -> str:
    """``sql`` with its ``%s`` replaced by ``args`` as literals (``cur.mogrify``'s work);
    the session's escaping mode read once, not for every value."""
    backslashes = not conn.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES
    return sql % tuple([_literal(conn, v, backslashes) for v in args])


def _texts(conn: aiomysql.Connection, sql: str,
           rows: Sequence[Sequence[Any]] | None) -> list[str] | None:
    """``sql`` with ``rows`` in it, as statements to send (none for no rows; None for
    several rows of a statement that is not an INSERT). An INSERT of several rows
    becomes one multi-row INSERT, as aiomysql's ``executemany`` makes, or several where
    its rows are over ``_STATEMENT_CHARS``, but sent with the transaction's other
    statements instead of on its own: a batch's transaction was five round trips, each
    one a wait for a busy event loop. (The rows once went as one JSON parameter the
    server expanded with JSON_TABLE: its CPU an envelope fell by a third as plain rows,
    ours rose by less, once values were written by ``_literal``.)"""
    if rows is None:
        return [sql]
    if not rows:
        return []
    m = _INSERT_ROWS.match(sql)
    if m is None:
        return [_mogrify(conn, sql, rows[0])] if len(rows) == 1 else None
    head, values, tail = m.group(1) % (), m.group(2).rstrip(), m.group(3) or ""
    out: list[str] = []
    chunk: list[str] = []
    size = 0
    for row in rows:
        text = _mogrify(conn, values, row)
        if chunk and size + len(text) > _STATEMENT_CHARS:
            out.append(head + ",".join(chunk) + tail)
            chunk, size = [], 0
        chunk.append(text)
        size += len(text) + 1
    out.append(head + ",".join(chunk) + tail)
    return out


async def _connected(conn: aiomysql.Connection) -> None:
    """Nothing to do on the connection: getting one was the point (``_schema``)."""


class MysqlBackend(Backend):
    """A small aiomysql pool, created on first use and rebuilt after connection loss."""

    dialect = Dialect("mysql")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        database = unquote(parts.path.lstrip("/"))
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        # The login (and what the URL leaves out) may live in AWS Secrets Manager:
        # ?secret_name=...&region_name=... (docs/settings.md); fetched on first use and
        # again when the database refuses it (rotation).
        self._secret: RefreshingLogin | None = None
        if query.get("secret_name"):
            self._secret = RefreshingLogin(SecretRef(query["secret_name"],
                                                     query.get("region_name") or None))
        elif not parts.hostname or not database:
            raise ConfigError("DATABASE_URL needs a host and a database: "
                              "mysql://user:pass@host:3306/db")
        elif not parts.username:
            # Never the server's default user (root, or the OS user): say whose login.
            raise ConfigError("DATABASE_URL names no user and no secret holds the login: "
                              "mysql://user@host:3306/db (or DB_USER), or a Secrets Manager "
                              "secret (DATABASE_SECRET_NAME)")
        try:
            self.pool_size = int(query.get("pool_size", 4))
            self.timeout = float(query.get("timeout", 30))
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"DATABASE_URL: {exc}") from None
        tls: ssl.SSLContext | None = None
        if query.get("ssl_ca") or query.get("ssl", "").lower() in ("1", "true", "required"):
            tls = ssl.create_default_context(cafile=query.get("ssl_ca") or None)
        self.database = database
        self.host, self.port = parts.hostname or "", port or 3306
        # What the URL gives wins over the secret; the secret fills in the rest.
        self._given: dict[str, Any] = {
            "host": parts.hostname, "port": port, "db": database or None,
            "user": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None,
        }
        self._params: dict[str, Any] = {
            "charset": "utf8mb4",
            "connect_timeout": min(self.timeout, 5.0),
            "autocommit": False,
            "init_command": "SET time_zone = '+00:00'",
            "ssl": tls,
        }
        self._pool: aiomysql.Pool | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def describe(self) -> str:
        return (f"MySQL at {self.host or '(host from the secret)'}:{self.port}/"
                f"{self.database or '(database from the secret)'}")

    async def _login(self) -> dict[str, Any]:
        """Host, port, db, user and password: the URL's, then the secret's for the rest."""
        given = {k: v for k, v in self._given.items() if v is not None}
        if self._secret is not None:
            try:
                login = await self._secret.get()
            except ConfigError as exc:  # Secrets Manager away or the secret unreadable
                raise StoreError(f"the login to {self.describe()} cannot be read from "
                                 f"Secrets Manager: {exc}") from None
            found = {"host": login.host, "port": login.port, "db": login.database,
                     "user": login.user, "password": login.password}
            given = {**{k: v for k, v in found.items() if v is not None}, **given}
        if not given.get("host") or not given.get("db"):
            raise ConfigError(f"{self.describe()}: neither DATABASE_URL nor "
                              f"{self._secret.ref if self._secret else 'a secret'} gives "
                              "the host and the database name")
        self.host, self.port = given["host"], int(given.get("port") or 3306)
        self.database = given["db"]
        return {"port": 3306, "password": "", **given}

    async def _get_pool(self) -> aiomysql.Pool:
        async with self._lock:
            if self._closed:
                # A task still running at shutdown must not open a new pool that nobody
                # closes: its sessions would hold the tables (a DROP waited on them).
                raise StoreError(f"{self.describe()}: the store is closed")
            if self._pool is None:
                # pool_recycle: MySQL drops idle sessions after wait_timeout (and proxies
                # like RDS Proxy sooner); never reuse one idle for more than 5 minutes.
                self._pool = await aiomysql.create_pool(
                    minsize=1, maxsize=self.pool_size, pool_recycle=300,
                    **self._params, **await self._login(),
                )
            return self._pool

    async def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            await pool.wait_closed()

    async def _run(self, what: str, op: Callable[[aiomysql.Connection], Awaitable[T]]) -> T:
        """Run ``op`` on a pooled connection within the timeout; translate errors."""
        pool: aiomysql.Pool | None = None
        conn: aiomysql.Connection | None = None
        try:
            async with asyncio.timeout(self.timeout):
                pool = await self._get_pool()
                conn = await pool.acquire()
                result = await op(conn)
            held, conn = conn, None
            await pool.release(held)
            return result
        except BaseException as exc:
            if conn is not None and pool is not None:
                conn.close()  # the server rolls back; a closed connection leaves the pool
                await pool.release(conn)  # already done for a closed connection
            if not isinstance(exc, Exception):
                raise  # cancellation: the connection is gone, the caller is leaving
            # Anything failing before a connection was in hand (including aiomysql's
            # RuntimeError from a pool another task just dropped) is reachability.
            if conn is None or _connection_lost(exc):
                await self._drop_pool()
                if isinstance(exc, StoreError):
                    raise  # said already (the secret cannot be read, the store closed)
                if self._secret is not None and _login_refused(exc):
                    self._secret.stale()  # rotated: the next try reads the secret again
                if isinstance(exc, TimeoutError):
                    raise StoreError(
                        f"{self.describe()}: no answer within {self.timeout:g} s ({what})"
                    ) from exc
                raise StoreError(f"cannot reach {self.describe()}: {exc}") from exc
            if isinstance(exc, pymysql.err.Error):
                if exc.args and exc.args[0] in _RETRYABLE:
                    raise StoreError(f"{self.describe()} busy, retry ({what}): {exc}") from exc
                raise StoreRejectedError(f"{self.describe()} refused ({what}): {exc}") from exc
            raise

    async def transaction(self, statements: Sequence[Statement]) -> list[int]:
        return (await self.read_then_write((), statements))[1]

    async def read_then_write(self, reads: Sequence[Query], statements: Sequence[Statement],
                              ) -> tuple[list[dict[str, Any]], list[int]]:
        async def run(conn: aiomysql.Connection) -> tuple[list[dict[str, Any]], list[int]]:
            read: list[dict[str, Any]] = []
            async with conn.cursor(_QuietCursor) as cur:
                if not getattr(conn, "_read_committed", False):
                    # The INSERT ... SELECTs copying robot_state into history and the
                    # targets then read a consistent snapshot instead of share- and
                    # gap-locking what they read (concurrent replicas deadlocked on it).
                    await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    conn._read_committed = True
                # Statements sent together, in one round trip: the reads first.
                pending = [_mogrify(conn, sql, args) for sql, args in reads]
                owners = [-1] * len(pending)  # the statement each text is part of
                size = sum(map(len, pending))  # characters
                counts = [0] * len(statements)

                async def send() -> None:
                    nonlocal size
                    for owner, n in zip(owners, await _together(cur, pending, read),
                                        strict=True):
                        if owner >= 0:
                            counts[owner] += n
                    pending.clear()
                    owners.clear()
                    size = 0

                for i, (sql, rows) in enumerate(statements):
                    texts = _texts(conn, sql, rows)
                    if texts is None:  # not an INSERT: a row at a time, on its own
                        if pending:
                            await send()
                        await cur.executemany(sql, rows)
                        counts[i] = max(cur.rowcount, 0)
                        continue
                    for text in texts:
                        if pending and size + len(text) > _TOGETHER_CHARS:
                            await send()
                        pending.append(text)
                        owners.append(i)
                        size += len(text)
                pending.append("COMMIT")
                owners.append(-1)
                await send()
            return read, counts

        return await self._run("write", run)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        async def run(conn: aiomysql.Connection) -> list[dict[str, Any]]:
            async with conn.cursor(aiomysql.DictCursor) as cur:
                # The COMMIT ends the read's snapshot (the next read sees new rows) and
                # its metadata locks (a migration's ALTER waits on them); sent with the
                # SELECT, one round trip instead of two.
                text = sql.rstrip().rstrip(";")
                await cur.execute(f"{_mogrify(conn, text, args) if args else text};\nCOMMIT")
                rows = list(await cur.fetchall())
                await cur.nextset()  # the COMMIT's answer
            return rows

        return await self._run("read", run)

    async def _schema(self, table: str) -> tuple[str, str]:
        """``table``'s database and name. An unqualified table is in the connection's
        database, which a secret may name (its ``dbname``): the first connection reads
        it, so connect before it is needed. An empty name here would describe no table,
        and ``migrate`` would take every table it owns for an earlier version's."""
        database, _, name = table.rpartition(".")
        if not database and not self.database:
            await self._run("connect", _connected)
        return database or self.database, name

    async def columns(self, table: str) -> dict[str, int | None]:
        rows = await self.fetch(
            "SELECT COLUMN_NAME AS c, CHARACTER_MAXIMUM_LENGTH AS n"
            " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            await self._schema(table),
        )
        return {str(r["c"]): None if r["n"] is None else int(r["n"]) for r in rows}

    async def column_info(self, table: str) -> dict[str, ColumnInfo]:
        rows = await self.fetch(
            "SELECT COLUMN_NAME AS c, COLUMN_TYPE AS t, CHARACTER_MAXIMUM_LENGTH AS n,"
            " COLLATION_NAME AS k FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            await self._schema(table),
        )
        out = {}
        for r in rows:
            declared = r["t"].decode() if isinstance(r["t"], bytes) else str(r["t"])
            out[str(r["c"])] = ColumnInfo(
                declared, family_of(declared), None if r["n"] is None else int(r["n"]),
                str(r["k"] or "").endswith("_ci"))
        return out

    async def create_statement(self, table: str) -> str | None:
        database, name = await self._schema(table)
        quoted = self.dialect.quote(f"{database}.{name}")
        try:
            rows = await self.fetch(f"SHOW CREATE TABLE {quoted}")
        except StoreRejectedError:
            return None
        return str(rows[0]["Create Table"]) if rows else None

    async def unique_keys(self, table: str) -> list[frozenset[str]]:
        rows = await self.fetch(
            "SELECT INDEX_NAME AS i, COLUMN_NAME AS c FROM information_schema.STATISTICS"
            " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND NON_UNIQUE = 0",
            await self._schema(table),
        )
        keys: dict[str, set[str]] = {}
        for r in rows:
            keys.setdefault(str(r["i"]), set()).add(str(r["c"]))
        return [frozenset(cols) for cols in keys.values()]

    async def missing_databases(self, names: set[str]) -> set[str]:
        if not names:
            return set()
        marks = ", ".join(["%s"] * len(names))
        rows = await self.fetch(
            f"SELECT SCHEMA_NAME AS s FROM information_schema.SCHEMATA"
            f" WHERE SCHEMA_NAME IN ({marks})", sorted(names))
        return names - {str(r["s"]) for r in rows}

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            await pool.wait_closed()
