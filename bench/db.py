"""MariaDB helpers: the bench's own database, row counts, commit-visibility polling.

The bench writes to its own database (``pudu_bench`` by default) so it never touches
the tables the test suite uses in ``test``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomysql
import pymysql

from bench.procs import cpu_seconds

LOG_TABLE = "mqtt_message_log"


def connect_kwargs(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or ""),
        "database": parts.path.lstrip("/") or "test",
    }


def connect(url: str, *, database: bool = True) -> pymysql.connections.Connection[Any]:
    kwargs = connect_kwargs(url)
    if not database:
        kwargs.pop("database")
    # One connection per call site, TLS off: docs/measured.md, PyMySQL builds a TLS context
    # on every connect otherwise.
    return pymysql.connect(autocommit=True, charset="utf8mb4", ssl_disabled=True, **kwargs)


def ensure_database(url: str) -> str:
    """Create the bench database if missing; returns the server version."""
    name = connect_kwargs(url)["database"]
    with connect(url, database=False) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
        cur.execute("SELECT VERSION()")
        return str(cur.fetchone()[0])


def reset(url: str, *, drop: bool = False) -> None:
    """Empty (or drop) every table of the bench database."""
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        for (table,) in cur.fetchall():
            cur.execute(f"{'DROP TABLE' if drop else 'TRUNCATE TABLE'} `{table}`")


def execute(url: str, sql: str) -> None:
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql)


NO_SUCH_TABLE = 1146


def statements(url: str) -> int:
    """Statements the server has run since it started (``Questions``: every client's)."""
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Questions'")
        return int(cur.fetchone()[1])


def server_pid(url: str) -> int | None:
    """The database server's PID, when it runs on this machine and says where its PID file
    is (to count its CPU beside the product's); None otherwise."""
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@pid_file")
        path = cur.fetchone()[0]
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, TypeError, ValueError):
        return None


def server_cpu(pid: int | None) -> float:
    """CPU seconds of the database server found by ``server_pid``; NaN without one."""
    return cpu_seconds(pid) if pid is not None else float("nan")


def count(url: str, table: str) -> int:
    """Rows in ``table``; 0 while it does not exist yet (the service creates it)."""
    with connect(url) as conn, conn.cursor() as cur:
        try:
            cur.execute(f"SELECT COUNT(*) FROM `{table}`")
        except pymysql.err.ProgrammingError as exc:
            if exc.args[0] == NO_SUCH_TABLE:
                return 0
            raise
        return int(cur.fetchone()[0])


def epoch(value: Any) -> float:
    """Epoch seconds of a DATETIME(3) read back (naive, UTC) or a number."""
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC).timestamp()  # stored as UTC (rows.when)
    return float(value)


def stored_minus_received(url: str) -> list[float]:
    """Per logged message: ``stored_at`` (set just before the batch's COMMIT on the
    callback server) minus the envelope's ``received_at`` (edge clock at accept), s."""
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT received_at, stored_at FROM {LOG_TABLE}")
        return [epoch(stored) - float(received) for received, stored in cur.fetchall()]


class VisibilityPoller:
    """Finds when each message id becomes visible (committed) in the message log.

    Every ``interval`` it asks for the ids still outstanding. A row found by the query
    issued at ``t`` became visible after the previous query (or after it was added)
    and before ``t``; the midpoint is taken, so the error is half the poll period.
    Autocommit: each SELECT reads a fresh snapshot (REPEATABLE READ would freeze one).
    """

    def __init__(self, url: str, *, interval: float = 0.002) -> None:
        self.url = url
        self.interval = interval
        self.outstanding: dict[str, tuple[float, float]] = {}  # id -> (sent, added)
        self.latencies: list[float] = []
        self.polls = 0
        self._stop = asyncio.Event()

    def add(self, message_id: str, sent_wall: float) -> None:
        self.outstanding[message_id] = (sent_wall, time.time())

    async def run(self) -> None:
        kwargs = connect_kwargs(self.url)
        conn = await aiomysql.connect(
            host=kwargs["host"], port=kwargs["port"], user=kwargs["user"],
            password=kwargs["password"], db=kwargs["database"], autocommit=True)
        previous = time.time()
        try:
            while not (self._stop.is_set() and not self.outstanding):
                ids = list(self.outstanding)[:1000]
                issued = time.time()
                if ids:
                    async with conn.cursor() as cur:
                        marks = ",".join(["%s"] * len(ids))
                        await cur.execute(
                            f"SELECT id FROM {LOG_TABLE} WHERE id IN ({marks})", ids)
                        found = [row[0] for row in await cur.fetchall()]
                    self.polls += 1
                    for message_id in found:
                        sent, added = self.outstanding.pop(message_id)
                        self.latencies.append((max(previous, added) + issued) / 2 - sent)
                previous = issued
                await asyncio.sleep(self.interval)
        finally:
            conn.close()

    def stop(self) -> None:
        """Finish once every outstanding id was found."""
        self._stop.set()


def percentile(values: Iterable[float], q: float) -> float:
    data = sorted(values)
    if not data:
        return float("nan")
    rank = min(len(data) - 1, max(0, round(q / 100 * len(data) + 0.5) - 1))
    return data[rank]
