"""The webhooks part as one object the callback server holds and the routes reach
(``app.state.webhooks``): store, event source, gateway presence, delivery."""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.http.outbound import OutboundPolicy
from callback_server.signed_post import Retry
from callback_server.store.protocol import SqlAccess
from callback_server.webhooks.delivery import WebhookDelivery
from callback_server.webhooks.events import EventSource
from callback_server.webhooks.presence import GatewayPresence
from callback_server.webhooks.store import WebhookStore


@dataclass
class Webhooks:
    """Enter ``delivery``, run ``delivery.run`` and ``presence.run``; feed ``source``
    from the server."""

    store: WebhookStore
    outbound: OutboundPolicy
    delivery: WebhookDelivery
    presence: GatewayPresence = field(init=False)
    source: EventSource = field(init=False)

    def __post_init__(self) -> None:
        self.presence = GatewayPresence(self.store, self.delivery.submit)
        self.source = EventSource(self.delivery.submit, self.presence.put)

    @classmethod
    def open(cls, sql: SqlAccess, outbound: OutboundPolicy, retry: Retry,
             timeout: float) -> Webhooks:
        store = WebhookStore(sql)
        return cls(store, outbound, WebhookDelivery(store, outbound, retry, timeout))
