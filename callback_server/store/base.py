"""The small interface a database backend offers the store.

A backend runs a list of statements as one transaction (``executemany`` for each),
fetches rows as dicts, and describes existing tables. It translates its library's
errors to StoreError, once, in its own module. None connects at construction: the
server must be able to start (degraded) while the database is down.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from callback_server.store.dialect import Dialect

#: ``(sql, rows)``: ``executemany(sql, rows)``, skipped when ``rows`` is empty; or
#: ``(sql, None)``: run once without parameters (DDL).
Statement = tuple[str, Sequence[Sequence[Any]] | None]


class Backend(abc.ABC):
    """One database: a pool (MySQL) or one connection on one thread (SQLite)."""

    dialect: Dialect

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the database is, for messages (never the password)."""

    @abc.abstractmethod
    async def transaction(self, statements: Sequence[Statement]) -> list[int]:
        """Run the statements in one transaction and commit; rows affected by each."""

    @abc.abstractmethod
    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of one query, as dicts."""

    @abc.abstractmethod
    async def columns(self, table: str) -> dict[str, int | None]:
        """Columns of ``table`` (``db.table`` allowed) with their character limit where
        the database enforces one; empty if the table does not exist."""

    @abc.abstractmethod
    async def unique_keys(self, table: str) -> list[frozenset[str]]:
        """Column sets of the primary key and unique indexes of ``table``."""

    @abc.abstractmethod
    async def missing_databases(self, names: set[str]) -> set[str]:
        """Which of ``names`` do not exist yet (and need CREATE DATABASE)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the backend may not be used afterwards."""
