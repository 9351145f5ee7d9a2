"""Reading the callback server's tables from tests, for MariaDB and SQLite alike."""

from __future__ import annotations

import re
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pymysql
import pymysql.cursors

from callback_server.store.base import Backend


def query(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows as dicts; ``sql`` uses ``?`` placeholders for both backends."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql, args).fetchall()]
    parts = urlsplit(url)
    conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306,
                           user=parts.username or "root", password=parts.password or "",
                           database=parts.path.lstrip("/"),
                           cursorclass=pymysql.cursors.DictCursor)
    with conn, conn.cursor() as cur:
        cur.execute(sql.replace("?", "%s"), args)
        rows = list(cur.fetchall())
        conn.commit()
        return rows


@contextmanager
def scratch_mysql_database(server: str = "127.0.0.1", port: int = 3306) -> Iterator[str]:
    """A fresh database on the shared MariaDB, dropped afterwards; yields its URL."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host=server, port=port, user="root", password="")
    with conn:
        conn.cursor().execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql://root:@{server}:{port}/{name}"
    finally:
        conn = pymysql.connect(host=server, port=port, user="root", password="")
        with conn:
            cur = conn.cursor(pymysql.cursors.DictCursor)
            # A session of the test still holding a table of it would make DROP wait for
            # ever: fail within a minute instead, naming who holds what.
            cur.execute("SET SESSION lock_wait_timeout = 60")
            try:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            except pymysql.err.OperationalError as exc:
                cur.execute("SELECT id, db, command, time, state, info"
                            " FROM information_schema.processlist WHERE db = %s", (name,))
                raise RuntimeError(f"cannot drop {name}: {exc}; sessions: {cur.fetchall()}") \
                    from exc


async def scans(backend: Backend, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
    """The steps of ``sql``'s plan that read a table (or an index) whole, or all rows
    under a prefix of a key, instead of looking rows up by key: MySQL's ``EXPLAIN``
    types ``ALL`` and ``index``; SQLite's ``SCAN`` of a table (not of a list of
    constants) and a ``SEARCH`` on fewer columns than its index has."""
    if backend.dialect.mysql:
        plan = await backend.fetch(f"EXPLAIN {sql}", args)
        assert plan, sql
        return [r for r in plan if r["type"] in ("ALL", "index")]
    plan = await backend.fetch(f"EXPLAIN QUERY PLAN {sql}", args)
    assert plan, sql
    out = []
    for step in plan:
        detail = str(step["detail"])
        if detail.startswith("SCAN") and "CONSTANT ROWS" not in detail:
            out.append(step)
        elif found := re.match(r"SEARCH \S+ USING (?:COVERING )?INDEX (\S+) \((.*)\)", detail):
            # a search on a prefix of an index reads every row under that prefix
            columns = await backend.fetch(f"PRAGMA index_info({found[1]})")
            if found[2].count("=?") < len(columns):
                out.append(step)
    return out
