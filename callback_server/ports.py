"""What the callback server's HTTP routes need from the server, as a protocol.

``create_app`` and the Pudu routes are typed against ``AppHost``, not the composition
root (``callback_server.service``), so neither imports it and there is no import circle.
"""

from __future__ import annotations

from typing import Any, Protocol

from bridge.commands import CommandClient, CommandOutcome
from bridge.health import Readiness
from bridge.outbound import OutboundPolicy
from callback_server.access import Access, Principal
from callback_server.alerts import AlertDelivery, AlertEngine, AlertStore, AlertSubscriptions
from callback_server.batcher import BatchWriter
from callback_server.config import CallbackSettings
from callback_server.console import ConsoleHub
from callback_server.consumer import Consumer
from callback_server.metrics import CallbackMetrics
from callback_server.store import Store

__all__ = ["AppHost"]


class AppHost(Protocol):
    """The server as its HTTP app sees it."""

    settings: CallbackSettings
    version: str
    access: Access
    store: Store
    writer: BatchWriter
    consumer: Consumer
    commands: CommandClient
    metrics: CallbackMetrics
    gateways: dict[str, dict[str, Any]]
    outbound: OutboundPolicy
    alerts: AlertEngine
    alert_store: AlertStore
    alert_delivery: AlertDelivery
    alert_subscriptions: AlertSubscriptions
    console: ConsoleHub
    readiness: Readiness

    async def health(self) -> dict[str, Any]: ...

    def org_of(self, device_id: str, caller: Principal | None = None) -> str: ...

    async def record_command(self, outcome: CommandOutcome,
                             key_name: str | None = None) -> None: ...

    def refresh_gauges(self) -> None: ...
