"""Alerts: rules over robot state, presence, telemetry and time; one open alert per
(rule, subject) whatever the replica count; delivery by signed webhook and MQTT.

    rules.py     settings (defaults, ALERT_RULES_FILE) and pure decisions
    alert.py     Alert, Subject, Transition
    store.py     the alert tables: conditional writes, so a transition happens once
    engine.py    inputs -> decisions -> transitions (and the leased time-based sweep)
    delivery.py  MQTT {prefix}org/{org}/alerts, listeners, and events to the webhooks
    alert_subscriptions.py  /alert-subscriptions as a view of the webhooks (style ``alert``)
    routes.py    /alerts and /alert-subscriptions
"""

from callback_server.alerts.alert import Alert, Subject, Transition
from callback_server.alerts.alert_subscriptions import AlertSubscription, AlertSubscriptions
from callback_server.alerts.delivery import AlertDelivery
from callback_server.alerts.engine import AlertEngine
from callback_server.alerts.rules import (
    CHARGING_STATES,
    RULES,
    AlertSettings,
    load_alert_settings,
)
from callback_server.alerts.store import AlertStore

__all__ = [
    "CHARGING_STATES",
    "RULES",
    "Alert",
    "AlertDelivery",
    "AlertEngine",
    "AlertSettings",
    "AlertStore",
    "AlertSubscription",
    "AlertSubscriptions",
    "Subject",
    "Transition",
    "load_alert_settings",
]
