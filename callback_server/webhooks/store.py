"""The webhook tables: subscriptions by event type and every delivery attempt.

Declared here (not in the product's schema) and created on first use with ``CREATE TABLE
IF NOT EXISTS``: both databases, the same statements, like the alert tables.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bridge.paging import Page
from callback_server.alerts.alert import iso
from callback_server.keys import ALL_ORGS
from callback_server.store.protocol import SqlAccess
from callback_server.store.query import Where
from callback_server.store.schema import Column, TableSpec

WEBHOOKS_TABLE = "webhooks"
WEBHOOK_DELIVERIES_TABLE = "webhook_deliveries"
WEBHOOKS = TableSpec(
    columns=(
        Column("id", "key", 32),
        Column("url", "str", 2048),
        Column("secret", "str", 256),        # needed to sign; never shown after creation
        Column("events", "text", 2000),      # JSON list of event names
        Column("orgs", "text", 4000),        # JSON list; ["*"]: every org
        Column("created_by", "str", 128),
        Column("created_at", "float"),
    ),
    key=("id",),
)
WEBHOOK_DELIVERIES = TableSpec(
    columns=(
        Column("id", "serial"),
        Column("webhook_id", "str", 32),
        Column("event_id", "str", 32),
        Column("event", "str", 32),
        Column("attempt", "int"),
        Column("status", "int"),             # HTTP status; NULL: no answer
        Column("latency_ms", "float"),
        Column("outcome", "str", 16),        # delivered | failed | gave_up | refused
        Column("at", "float"),
    ),
    key=("id",),
)
TABLES = {WEBHOOKS_TABLE: WEBHOOKS, WEBHOOK_DELIVERIES_TABLE: WEBHOOK_DELIVERIES}


@dataclass(frozen=True, slots=True)
class Webhook:
    """A receiver of ``events`` in ``orgs``."""

    id: str
    url: str
    secret: str
    events: tuple[str, ...]
    orgs: tuple[str, ...]
    created_by: str | None
    created_at: float

    def wants(self, event: str, org: str) -> bool:
        return event in self.events and (ALL_ORGS in self.orgs or org in self.orgs)

    def public(self) -> dict[str, Any]:
        """The API view: never the secret."""
        return {"id": self.id, "url": self.url, "events": list(self.events),
                "orgs": list(self.orgs), "created_by": self.created_by,
                "created_at": iso(self.created_at)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Webhook:
        return cls(id=str(row["id"]), url=str(row["url"]), secret=str(row["secret"]),
                   events=tuple(json.loads(row["events"] or "[]")),
                   orgs=tuple(json.loads(row["orgs"] or "[]")),
                   created_by=row.get("created_by"), created_at=float(row["created_at"]))


class WebhookStore:
    """Webhooks and their delivery log on the callback server's store."""

    def __init__(self, store: SqlAccess) -> None:
        self.store = store
        self.d = store.dialect
        self.backend = store.backend
        self._created = False

    async def _ready(self) -> None:
        await self.store.ready()
        if not self._created:
            for name, spec in TABLES.items():
                await self.backend.transaction([(self.d.create_table(name, spec), None)])
            await self.backend.transaction(
                [(self.d.create_index(WEBHOOK_DELIVERIES_TABLE, "webhook_id"), None)])
            self._created = True

    async def _write(self, sql: str, row: Sequence[Any]) -> int:
        await self._ready()
        return (await self.backend.transaction([(sql, [tuple(row)])]))[0]

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        await self._ready()
        return await self.backend.fetch(sql, args)

    async def add(self, url: str, events: Sequence[str], orgs: Sequence[str], by: str | None,
                  now: float, secret: str | None = None) -> Webhook:
        hook = Webhook(id="wh_" + secrets.token_hex(8), url=url,
                       secret=secret or secrets.token_hex(32), events=tuple(events),
                       orgs=tuple(orgs), created_by=by, created_at=now)
        await self._write(self.d.insert(WEBHOOKS_TABLE, WEBHOOKS.names),
                          (hook.id, hook.url, hook.secret, json.dumps(list(hook.events)),
                           json.dumps(list(hook.orgs)), by, now))
        return hook

    async def all(self, after: str | None = None) -> list[Webhook]:
        """Every webhook by id (after ``after``)."""
        m = self.d.mark
        clause, args = (f" WHERE id > {m}", [after]) if after is not None else ("", [])
        rows = await self._fetch(f"SELECT {', '.join(WEBHOOKS.names)} FROM "
                                 f"{self.d.quote(WEBHOOKS_TABLE)}{clause} ORDER BY id", args)
        return [Webhook.from_row(r) for r in rows]

    async def get(self, hook_id: str) -> Webhook | None:
        rows = await self._fetch(f"SELECT {', '.join(WEBHOOKS.names)} FROM "
                                 f"{self.d.quote(WEBHOOKS_TABLE)} WHERE id = {self.d.mark}",
                                 (hook_id,))
        return Webhook.from_row(rows[0]) if rows else None

    async def delete(self, hook_id: str) -> bool:
        return bool(await self._write(
            f"DELETE FROM {self.d.quote(WEBHOOKS_TABLE)} WHERE id = {self.d.mark}", (hook_id,)))

    async def record(self, hook_id: str, event_id: str, event: str, attempt: int,
                     status: int | None, latency_ms: float | None, outcome: str,
                     now: float) -> None:
        await self._write(
            self.d.insert(WEBHOOK_DELIVERIES_TABLE, WEBHOOK_DELIVERIES.names[1:]),
            (hook_id, event_id, event, attempt, status, latency_ms, outcome, now))

    async def deliveries(self, hook_id: str, *, limit: int, after: int | None = None,
                         ) -> Page[dict[str, Any]]:
        """The delivery log of one webhook, newest first, a keyset page."""
        q = Where(self.d).equal("webhook_id", hook_id) \
            .after(None if after is None else [after], "id", descending=True)
        rows = await self._fetch(
            f"SELECT {', '.join(WEBHOOK_DELIVERIES.names)} FROM "
            f"{self.d.quote(WEBHOOK_DELIVERIES_TABLE)}{q.sql()}{q.page('id DESC', limit)}",
            q.args)
        return Page.of(rows, limit, lambda r: [int(r["id"])]).map(lambda r: {
            "id": int(r["id"]), "at": iso(r["at"]), "event_id": r["event_id"],
            "event": r["event"], "attempt": int(r["attempt"]),
            "status": None if r["status"] is None else int(r["status"]),
            "latency_ms": None if r["latency_ms"] is None else float(r["latency_ms"]),
            "outcome": r["outcome"]})
