"""The small interface a database backend offers the store.

A backend runs a list of statements as one transaction (``executemany`` for each),
fetches rows as dicts, and describes existing tables. It translates its library's
errors to StoreError, once, in its own module. None connects at construction: the
server must be able to start (degraded) while the database is down.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from callback_server.store.dialect import Dialect

#: ``(sql, rows)``: ``executemany(sql, rows)``, skipped when ``rows`` is empty; or
#: ``(sql, None)``: run once without parameters (DDL).
Statement = tuple[str, Sequence[Sequence[Any]] | None]

#: How a column stores a value: what the projection onto a target converts to.
Family = Literal["int", "datetime", "number", "text"]


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """One existing column, as ``information_schema`` (SQLite: ``PRAGMA table_info``)
    describes it."""

    declared: str            # the column's type as the database shows it
    family: Family
    chars: int | None = None  # the most characters it takes, where enforced or declared
    folds_case: bool = False  # a case-insensitive collation: ``a`` and ``A`` are one key


def family_of(declared: str) -> Family:
    """The family of a declared type, by the same rules as SQLite's type affinity."""
    t = declared.lower()
    if "int" in t:
        return "int"
    if "date" in t or "time" in t:
        return "datetime"
    if any(n in t for n in ("dec", "num", "real", "doub", "float")):
        return "number"
    return "text"


#: Keys one ``fetch_keyed`` query looks up at most (SQLite refuses an ``OR`` of 5,000
#: pairs, past its expression depth of 1,000; one of 500 it takes).
KEYS_A_QUERY = 500


#: A query and its parameters.
Query = tuple[str, Sequence[Any]]


def keyed(query: Callable[[int], str], keys: Sequence[Sequence[Any]]) -> list[Query]:
    """``query(n)`` for ``keys`` (composite keys, ``Dialect.pairs``), at most
    ``KEYS_A_QUERY`` a query: its parameters are its n keys' values in order."""
    out: list[Query] = []
    for i in range(0, len(keys), KEYS_A_QUERY):
        chunk = keys[i:i + KEYS_A_QUERY]
        out.append((query(len(chunk)), [v for k in chunk for v in k]))
    return out


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

    async def fetch_keyed(self, query: Callable[[int], str], keys: Sequence[Sequence[Any]]
                          ) -> list[dict[str, Any]]:
        """Rows of ``query(n)`` for ``keys`` (``keyed``)."""
        rows: list[dict[str, Any]] = []
        for sql, args in keyed(query, keys):
            rows += await self.fetch(sql, args)
        return rows

    async def read_then_write(self, reads: Sequence[Query], statements: Sequence[Statement],
                              ) -> tuple[list[dict[str, Any]], list[int]]:
        """The rows of ``reads``, read just before ``statements`` run in one transaction,
        and the rows each statement affected. Here a read and then the transaction; MySQL
        sends both in one round trip, the reads first in the transaction."""
        rows: list[dict[str, Any]] = []
        for sql, args in reads:
            rows += await self.fetch(sql, args)
        return rows, await self.transaction(statements)

    @abc.abstractmethod
    async def columns(self, table: str) -> dict[str, int | None]:
        """Columns of ``table`` (``db.table`` allowed) with their character limit where
        the database enforces one; empty if the table does not exist."""

    @abc.abstractmethod
    async def column_info(self, table: str) -> dict[str, ColumnInfo]:
        """Columns of ``table`` with type and collation; empty if it does not exist."""

    async def create_statement(self, table: str) -> str | None:
        """The database's own CREATE TABLE text for ``table`` (None: no such table)."""
        return None

    @abc.abstractmethod
    async def unique_keys(self, table: str) -> list[frozenset[str]]:
        """Column sets of the primary key and unique indexes of ``table``."""

    @abc.abstractmethod
    async def missing_databases(self, names: set[str]) -> set[str]:
        """Which of ``names`` do not exist yet (and need CREATE DATABASE)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the backend may not be used afterwards."""
