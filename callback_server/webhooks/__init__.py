"""Webhooks by event type: a receiver subscribes to ``robot.error``, ``run.failed``, ...

    events.py    the event names and what the server already learns -> events
    presence.py  gateway.online/offline, judged against the presence last told (stored)
    store.py     the webhook tables (alert subscriptions are rows of style ``alert``)
    delivery.py  dispatch to each webhook, by the one signed POST (callback_server.signed_post)
    routes.py    /webhooks and /api/v1/webhooks (the same handlers)
    service.py   the three held together for the callback server
"""

from callback_server.webhooks.delivery import WebhookDelivery
from callback_server.webhooks.events import EVENTS, Event, EventSource
from callback_server.webhooks.store import ALERT_EVENTS, Webhook, WebhookStore

__all__ = ["ALERT_EVENTS", "EVENTS", "Event", "EventSource", "Webhook", "WebhookDelivery",
           "WebhookStore"]
