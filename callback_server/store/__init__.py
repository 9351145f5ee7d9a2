"""Persistence for the callback server: MySQL/MariaDB (aiomysql) or SQLite.

    async with open_store(url, targets=load_targets(path)) as store:
        await store.migrate()
        result = await store.write_batch([(topic, envelope), ...])

``url`` is ``mysql://user:pass@host:3306/db`` or ``sqlite:///path``; the scheme picks
the backend from ``BACKENDS``. See ``SqlStore`` for the write and read contract,
migration.py for what the store owns and alters, projection.py for how the
``database_config.yaml`` targets are written (docs/storage.md).
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.clock import MAX_SKEW_SECONDS
from bridge.errors import ConfigError
from callback_server.store.base import Backend
from callback_server.store.mysql import MysqlBackend
from callback_server.store.protocol import BatchStore, Store
from callback_server.store.rows import Item
from callback_server.store.sql import EVENT_FIELDS, ROBOT_FIELDS, BatchResult, SqlStore
from callback_server.store.sqlite import SqliteBackend
from callback_server.store.targets import Table, Targets, load_targets

__all__ = [
    "BACKENDS",
    "EVENT_FIELDS",
    "ROBOT_FIELDS",
    "Backend",
    "BatchResult",
    "BatchStore",
    "Item",
    "SqlStore",
    "Store",
    "Table",
    "Targets",
    "load_targets",
    "open_store",
]


def _mysql(url: str, targets: Targets) -> Backend:
    return MysqlBackend(url)


def _sqlite(url: str, targets: Targets) -> Backend:
    return SqliteBackend(url, attach=targets.databases)


#: URL scheme -> backend factory (``mysql+aiomysql://`` and ``mariadb://`` work too).
BACKENDS: dict[str, Callable[[str, Targets], Backend]] = {
    "mysql": _mysql,
    "mariadb": _mysql,
    "sqlite": _sqlite,
}


def open_store(url: str, *, targets: Targets | None = None,
               max_skew: float = MAX_SKEW_SECONDS) -> SqlStore:
    """The store for a DATABASE_URL; ConfigError for an unknown scheme or a bad URL.

    Nothing connects yet: enter the store (``async with``) and use it. ``max_skew``:
    how far ahead of this clock a robot time may be and still order state.
    """
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    factory = BACKENDS.get(scheme)
    if factory is None:
        raise ConfigError(
            f"DATABASE_URL must be mysql://user:pass@host:3306/db or sqlite:///path, "
            f"got scheme {scheme!r}"
        )
    targets = targets or Targets()
    return SqlStore(factory(url, targets), targets, max_skew=max_skew)
