"""Persistence for the callback server: MySQL/MariaDB (aiomysql) or SQLite."""

from __future__ import annotations

from collections.abc import Callable

from bridge.errors import ConfigError
from callback_server.store.backends import Backend, MysqlBackend, SqliteBackend
from callback_server.store.sql import SqlStore
from callback_server.store.targets import Table, Targets, load_targets

Store = SqlStore

__all__ = ["Store", "Table", "Targets", "load_targets", "open_store"]


def _mysql(url: str, targets: Targets) -> Backend:
    return MysqlBackend(url)


def _sqlite(url: str, targets: Targets) -> Backend:
    return SqliteBackend(url, attach=targets.databases)


_BACKENDS: dict[str, Callable[[str, Targets], Backend]] = {
    "mysql": _mysql,
    "mariadb": _mysql,
    "sqlite": _sqlite,
}


def open_store(url: str, *, targets: Targets | None = None) -> SqlStore:
    """The store for ``mysql://user:pass@host:3306/db`` or ``sqlite:///path``."""
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    factory = _BACKENDS.get(scheme)
    if factory is None:
        raise ConfigError(f"DATABASE_URL must be mysql://... or sqlite:///..., got {scheme!r}")
    targets = targets or Targets()
    return SqlStore(factory(url, targets), targets)
