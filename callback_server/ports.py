"""What the callback server's HTTP routes need from the server, as a protocol.

Routes get the server as ``Host`` (``AppHost`` through ``Depends``, from
``app.state.host``), typed against this protocol, not the composition root
(``callback_server.service``), so none imports it and there is no import circle.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol, cast

from fastapi import Depends, Request

from bridge.commands import CommandClient, CommandOutcome
from bridge.http.outbound import OutboundPolicy
from bridge.service.health import Readiness
from callback_server.access import Access, Principal
from callback_server.alerts import AlertDelivery, AlertEngine, AlertStore, AlertSubscriptions
from callback_server.batcher import BatchWriter
from callback_server.console.hub import ConsoleHub
from callback_server.consumer import Consumer
from callback_server.metrics import CallbackMetrics
from callback_server.settings import CallbackSettings
from callback_server.store import Store

__all__ = ["AppHost", "Host", "app_host"]


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


async def app_host(request: Request) -> AppHost:
    """The server whose app this request came to (``app.state.host``, set by create_app)."""
    return cast(AppHost, request.app.state.host)


#: The server, as a route's dependency.
Host = Annotated[AppHost, Depends(app_host)]
