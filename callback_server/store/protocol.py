"""What the rest of the callback server needs from a store, as protocols.

``SqlStore`` satisfies all three; the batch writer needs only ``BatchStore`` (its test
doubles implement just that), the alerts, which keep tables of their own, ``SqlAccess``,
and the service, app and retention are typed against ``Store``, so no part above the
store depends on how it is built.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from types import TracebackType
from typing import Any, Protocol

from bridge.commands import CommandOutcome
from bridge.http.paging import Page
from callback_server.store.base import Backend
from callback_server.store.dialect import Dialect
from callback_server.store.rows import Item
from callback_server.store.sql import BatchResult
from callback_server.store.targets import Targets


class BatchStore(Protocol):
    """The batch writer's view: one transaction per batch; dead letters."""

    async def write_batch(self, items: Sequence[Item]) -> BatchResult: ...

    async def dead_letters(self, letters: Sequence[tuple[str, bytes, str]]) -> None: ...


class SqlAccess(Protocol):
    """For a part with tables of its own (the alerts): the dialect its SQL is written in,
    the backend that runs it, where robot state lives, and a wait for the schema."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def targets(self) -> Targets: ...

    async def ready(self) -> None: ...


class Store(BatchStore, SqlAccess, Protocol):
    """Everything the service, its HTTP app and retention use."""

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None: ...

    async def migrate(self, *, apply: bool = True, drop_added: bool = False,
                      ) -> list[str]: ...

    async def ping(self) -> bool: ...

    async def unreachable(self) -> str | None: ...

    async def record_command(self, outcome: CommandOutcome,
                             key_name: str | None = None) -> None: ...

    async def prune(self, table: str, older_than: float, batch: int = 5000) -> int: ...

    async def get_robot(self, sn: str, orgs: Collection[str] | None = None,
                        ) -> dict[str, Any] | None: ...

    async def get_robots_of(self, robots: Collection[tuple[str, str]],
                            ) -> list[dict[str, Any]]: ...

    async def list_robots(
        self, *, limit: int, after: Sequence[str] | str | None = None,
        orgs: Collection[str] | None = None, org: str | None = None,
        gateway: str | None = None, status: str | None = None,
    ) -> Page[dict[str, Any]]: ...

    async def list_events(
        self, sn: str, *, limit: int, after: Sequence[Any] | None = None,
        org: str | None = None,
    ) -> Page[dict[str, Any]]: ...

    async def list_history(
        self, sn: str, *, since: float, limit: int, after: float | None = None,
        org: str | None = None,
    ) -> Page[dict[str, Any]]: ...

    async def recent_positions(self, *, since: float, orgs: Collection[str] | None = None,
                               limit: int = 50_000) -> dict[str, list[list[float]]]: ...

    async def list_tasks(self, sn: str, *, limit: int,
                         org: str | None = None) -> list[dict[str, Any]]: ...

    async def recent_events(self, *, limit: int, orgs: Collection[str] | None = None,
                            ) -> list[dict[str, Any]]: ...

    async def get_runs(self, limit: int = 100, cursor: tuple[float, str] | None = None,
                       org_id: str | None = None, *, orgs: Sequence[str] | None = None,
                       ) -> Page[dict[str, Any]]: ...
