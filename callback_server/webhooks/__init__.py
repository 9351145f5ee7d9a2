"""Webhooks by event type: a receiver subscribes to ``robot.error``, ``run.failed``, ...

    events.py    the event names and what the server already learns -> events
    store.py     the webhook tables (declared there, created on first use)
    delivery.py  the one signed, retried, logged POST (alerts use it too) and dispatch
    routes.py    /webhooks and /api/v1/webhooks (the same handlers)
    service.py   the three held together for the callback server
"""

from callback_server.webhooks.delivery import WebhookDelivery, post_signed
from callback_server.webhooks.events import EVENTS, Event, EventSource
from callback_server.webhooks.store import Webhook, WebhookStore

__all__ = ["EVENTS", "Event", "EventSource", "Webhook", "WebhookDelivery", "WebhookStore",
           "post_signed"]
