"""``/alert-subscriptions`` as a view of the webhooks: a subscription is a webhook of
style ``alert`` hearing every transition event (``alert.opened``, ...) of some rules.

One store (the webhook tables), one delivery worker, one signing scheme; this module
only keeps the API's shape (``rules``, ``asub_`` ids, the delivery log's ``alert_id`` /
``transition`` / ``transition_id``) as it was documented before the webhooks existed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from callback_server.times import iso
from callback_server.webhooks.store import ALERT_EVENTS, Webhook, WebhookStore


@dataclass(frozen=True, slots=True)
class AlertSubscription:
    """A webhook that hears of transitions of ``rules`` (None: all) in ``orgs``."""

    id: str
    url: str
    secret: str
    rules: tuple[str, ...] | None
    orgs: tuple[str, ...]
    created_by: str | None
    created_at: float

    def public(self) -> dict[str, Any]:
        """The API view: never the secret."""
        return {"id": self.id, "url": self.url,
                "rules": None if self.rules is None else list(self.rules),
                "orgs": list(self.orgs), "created_by": self.created_by,
                "created_at": iso(self.created_at)}

    @classmethod
    def of(cls, hook: Webhook) -> AlertSubscription:
        return cls(id=hook.id, url=hook.url, secret=hook.secret, rules=hook.rules,
                   orgs=hook.orgs, created_by=hook.created_by, created_at=hook.created_at)


class AlertSubscriptions:
    """Alert subscriptions on the webhook store; ``changed`` tells the delivery worker."""

    def __init__(self, store: WebhookStore, changed: Callable[[], None]) -> None:
        self.store = store
        self.changed = changed

    async def add_subscription(self, url: str, rules: Sequence[str] | None,
                               orgs: Sequence[str], by: str | None, now: float,
                               secret: str | None = None) -> AlertSubscription:
        hook = await self.store.add(url, ALERT_EVENTS, orgs, by, now, secret, rules=rules,
                                    style="alert", prefix="asub_")
        self.changed()
        return AlertSubscription.of(hook)

    async def subscriptions(self, after: str | None = None) -> list[AlertSubscription]:
        """Every subscription by id (after ``after``)."""
        return [AlertSubscription.of(h) for h in await self.store.all(after)
                if h.style == "alert"]

    async def subscription(self, sub_id: str) -> AlertSubscription | None:
        hook = await self.store.get(sub_id)
        return AlertSubscription.of(hook) if hook is not None and hook.style == "alert" else None

    async def delete_subscription(self, sub_id: str) -> bool:
        if await self.subscription(sub_id) is None:
            return False
        deleted = await self.store.delete(sub_id)
        self.changed()
        return deleted

    async def deliveries(self, sub_id: str, *, limit: int, after: int | None = None,
                         ) -> tuple[list[dict[str, Any]], list[Any] | None]:
        """The delivery log of one subscription, newest first, a keyset page."""
        items, last = await self.store.deliveries(sub_id, limit=limit, after=after)
        return [{"id": r["id"], "at": r["at"], "alert_id": r["ref"],
                 "transition": str(r["event"]).removeprefix("alert."),
                 "transition_id": r["event_id"], "attempt": r["attempt"],
                 "outcome": r["outcome"]} for r in items], last
