"""The webhook tables: subscriptions by event type and every delivery attempt.

Declared in the product's schema (``callback_server/store/schema.py``, so ``migrate``
records them) and created on first use with ``CREATE TABLE IF NOT EXISTS``: both
databases, the same statements, like the alert tables. The alert
subscriptions are webhooks of style ``alert`` (their own body shape, a rule filter); the
``alert_subscriptions`` / ``alert_deliveries`` rows of earlier versions are moved here on
first use, once. ``webhook_presence`` holds each gateway's presence as last told to
subscribers, so a restart (or another replica) does not tell it again.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bridge.http.paging import Page
from callback_server.keys import ALL_ORGS
from callback_server.store.protocol import SqlAccess
from callback_server.store.query import Where
from callback_server.store.rows import key
from callback_server.store.schema import (
    ALERT_DELIVERIES,
    ALERT_DELIVERIES_TABLE,
    ALERT_SUBSCRIPTIONS,
    ALERT_SUBSCRIPTIONS_TABLE,
    WEBHOOK_DELIVERIES,
    WEBHOOK_DELIVERIES_TABLE,
    WEBHOOK_PRESENCE,
    WEBHOOK_PRESENCE_TABLE,
    WEBHOOK_TABLES,
    WEBHOOKS,
    WEBHOOKS_TABLE,
)
from callback_server.times import iso

TABLES = WEBHOOK_TABLES
#: Compare-and-set rounds before a presence write gives up to the replicas racing it.
_PRESENCE_TRIES = 3
#: The transitions an alert subscription hears of, as events (the view's ``events``).
ALERT_EVENTS = ("alert.opened", "alert.severity_changed", "alert.acknowledged",
                "alert.resolved")
#: Moved alert delivery rows keep their order below every new row: id - this.
MOVED_OFFSET = 1 << 40


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
    #: Alert rules whose events it hears of (None: all); set by alert subscriptions.
    rules: tuple[str, ...] | None = None
    #: ``event`` (the event body) or ``alert`` (an alert subscription's body and headers).
    style: str = "event"

    def wants(self, event: str, org: str, rule: str | None = None) -> bool:
        return (event in self.events and (ALL_ORGS in self.orgs or org in self.orgs)
                and (self.rules is None or rule in self.rules))

    def public(self) -> dict[str, Any]:
        """The API view: never the secret."""
        view = {"id": self.id, "url": self.url, "events": list(self.events),
                "orgs": list(self.orgs), "created_by": self.created_by,
                "created_at": iso(self.created_at)}
        if self.style != "event":
            view |= {"style": self.style,
                     "rules": None if self.rules is None else list(self.rules)}
        return view

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Webhook:
        return cls(id=str(row["id"]), url=str(row["url"]), secret=str(row["secret"]),
                   events=tuple(json.loads(row["events"] or "[]")),
                   orgs=tuple(json.loads(row["orgs"] or "[]")),
                   created_by=row.get("created_by"), created_at=float(row["created_at"]),
                   rules=None if not row.get("rules") else tuple(json.loads(row["rules"])),
                   style=str(row.get("style") or "event"))


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
                # Tables of an earlier version lack the columns added since.
                have = await self.backend.columns(name)
                for column in spec.columns:
                    if column.name not in have:
                        await self.backend.transaction(
                            [(self.d.add_column(name, column), None)])
            for indexed in ("webhook_id", "at"):  # the log's reads; retention's deletes
                await self.backend.transaction(
                    [(self.d.create_index(WEBHOOK_DELIVERIES_TABLE, indexed), None)])
            await self._move_alert_subscriptions()
            self._created = True

    async def _move_alert_subscriptions(self) -> None:
        """Rows of the alert subscription tables of earlier versions become webhooks of
        style ``alert`` and their delivery log, in one transaction that also empties the
        old tables; run again (a crash, a second replica) it inserts nothing twice: moved
        ids are kept (deliveries offset below every new id) and inserted ``IGNORE``."""
        if not await self.backend.columns(ALERT_SUBSCRIPTIONS_TABLE):
            return
        q = self.d.quote
        subs = await self.backend.fetch(
            f"SELECT {', '.join(ALERT_SUBSCRIPTIONS.names)} FROM "
            f"{q(ALERT_SUBSCRIPTIONS_TABLE)}")
        sent = await self.backend.fetch(
            f"SELECT {', '.join(ALERT_DELIVERIES.names)} FROM {q(ALERT_DELIVERIES_TABLE)} "
            f"ORDER BY id")
        if not subs and not sent:
            return
        events = json.dumps(list(ALERT_EVENTS))
        m = self.d.mark
        statements: list[tuple[str, list[tuple[Any, ...]] | None]] = []
        if subs:
            statements.append((self.d.insert_ignore(WEBHOOKS_TABLE, WEBHOOKS.names), [
                (s["id"], s["url"], s["secret"], events, s.get("orgs") or '["*"]',
                 s.get("created_by"), s["created_at"], s.get("rules") or None, "alert")
                for s in subs]))
            statements.append((f"DELETE FROM {q(ALERT_SUBSCRIPTIONS_TABLE)} WHERE id = {m}",
                               [(s["id"],) for s in subs]))
        if sent:
            statements.append((
                self.d.insert_ignore(WEBHOOK_DELIVERIES_TABLE, WEBHOOK_DELIVERIES.names), [
                    (int(r["id"]) - MOVED_OFFSET, r["subscription_id"], r["transition_id"],
                     f"alert.{r['transition']}", r["attempt"], None, None, r["outcome"],
                     r["at"], r["alert_id"]) for r in sent]))
            statements.append((f"DELETE FROM {q(ALERT_DELIVERIES_TABLE)} WHERE id <= {m}",
                               [(max(int(r["id"]) for r in sent),)]))
        await self.backend.transaction(statements)

    async def _write(self, sql: str, row: Sequence[Any]) -> int:
        await self._ready()
        return (await self.backend.transaction([(sql, [tuple(row)])]))[0]

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        await self._ready()
        return await self.backend.fetch(sql, args)

    async def add(self, url: str, events: Sequence[str], orgs: Sequence[str], by: str | None,
                  now: float, secret: str | None = None, *,
                  rules: Sequence[str] | None = None, style: str = "event",
                  prefix: str = "wh_") -> Webhook:
        hook = Webhook(id=prefix + secrets.token_hex(8), url=url,
                       secret=secret or secrets.token_hex(32), events=tuple(events),
                       orgs=tuple(orgs), created_by=by, created_at=now,
                       rules=None if rules is None else tuple(rules), style=style)
        await self._write(self.d.insert(WEBHOOKS_TABLE, WEBHOOKS.names),
                          (hook.id, hook.url, hook.secret, json.dumps(list(hook.events)),
                           json.dumps(list(hook.orgs)), by, now,
                           None if hook.rules is None else json.dumps(list(hook.rules)),
                           style))
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
                     now: float, ref: str | None = None) -> None:
        await self._write(
            self.d.insert(WEBHOOK_DELIVERIES_TABLE, WEBHOOK_DELIVERIES.names[1:]),
            (hook_id, event_id, event, attempt, status, latency_ms, outcome, now, ref))

    async def prune(self, older_than: float, batch: int = 5000) -> int:
        """Delete up to ``batch`` delivery attempts older than ``older_than`` (retention;
        alert subscriptions' among them); how many."""
        return await self._write(self.d.delete_older(WEBHOOK_DELIVERIES_TABLE, "at", batch),
                                 (older_than,))

    async def deliveries(self, hook_id: str, *, limit: int, after: int | None = None,
                         ) -> Page[dict[str, Any]]:
        """The delivery log of one webhook, newest first, a keyset page; ``ref`` is for
        views (the alert subscriptions' ``alert_id``), not the webhook API."""
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
            "outcome": r["outcome"], "ref": r["ref"]})

    async def presence(self, org: str, gateway: str, state: str, now: float,
                       ) -> tuple[bool, str | None]:
        """Record ``state``, received at ``now``, as ``gateway``'s presence: (changed, the
        presence before; None for a gateway not heard of before). A compare-and-set on
        the stored row, so of replicas told the same presence one finds it changed; a
        presence received before the stored one (a replica behind) changes nothing, and
        one that keeps losing the race to other states reports no change."""
        org_key, gw_key = key(org, 128), key(gateway, 128)
        d, table = self.d, self.d.quote(WEBHOOK_PRESENCE_TABLE)
        m = d.mark
        for _ in range(_PRESENCE_TRIES):
            rows = await self._fetch(
                f"SELECT state, since FROM {table} WHERE org_id = {m} AND gateway_id = {m}",
                (org_key, gw_key))
            if not rows:
                if await self._write(d.insert_ignore(WEBHOOK_PRESENCE_TABLE,
                                                     WEBHOOK_PRESENCE.names),
                                     (org_key, gw_key, state, now)):
                    return True, None
                continue  # another replica inserted it first: compare with its row
            before, since = str(rows[0]["state"]), float(rows[0]["since"] or 0.0)
            if before == state or since > now:
                return False, before  # the same, or older news than what was told
            if await self._write(
                    f"UPDATE {table} SET state = {m}, since = {m} WHERE org_id = {m} "
                    f"AND gateway_id = {m} AND state = {m} AND since <= {m}",
                    (state, now, org_key, gw_key, before, now)):
                return True, before
        return False, None
