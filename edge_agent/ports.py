"""What the edge agent's parts need from the agent, as protocols (narrow interfaces).

The webhook app and the built-in commands are handed the agent but typed against these,
so they import nothing from ``edge_agent.service`` (the composition root) and there is no
import circle; a test can hand them any object with these attributes.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from bridge.clock import GatewayClock, RobotClocks
from bridge.envelope import Envelope
from bridge.http.outbound import OutboundPolicy
from bridge.outbox import Outbox
from bridge.service.health import Readiness
from bridge.topic import TopicScheme
from bridge.transport import Transport
from edge_agent.downsample import Downsampler
from edge_agent.forwarding import ForwardPolicy
from edge_agent.journal import Journal
from edge_agent.metrics import EdgeMetrics
from edge_agent.publisher import OutboxPublisher
from edge_agent.robot_memory import RobotMemory
from edge_agent.settings import EdgeSettings

__all__ = ["AdminAgent", "AdminHost", "CommandHost", "PollHost", "PuduAgent", "PuduHost",
           "WebhookAgent", "WebhookHost", "agent_of"]


class WebhookHost(Protocol):
    """What the public app (the webhook) uses."""

    settings: EdgeSettings
    version: str
    metrics: EdgeMetrics
    scheme: TopicScheme
    outbox: Outbox
    policy: ForwardPolicy
    downsampler: Downsampler
    readiness: Readiness
    transport: Transport  # its limits: what the broker would refuse is refused at once
    clocks: RobotClocks  # the ordering rule's per-robot state (bridge/clock.py)
    gateway_clock: GatewayClock

    def note_robot(self, envelope: Envelope) -> None: ...

    def health(self) -> dict[str, Any]: ...


class AdminHost(Protocol):
    """What the admin listener's own routes (``/metrics``) use."""

    metrics: EdgeMetrics

    def refresh_gauges(self) -> None: ...


class CommandHost(Protocol):
    """What the built-in gateway commands use."""

    settings: EdgeSettings
    outbox: Outbox
    publisher: OutboxPublisher
    robots: dict[str, dict[str, Any]]

    def health(self) -> dict[str, Any]: ...


class PollHost(Protocol):
    """What the Pudu cloud poller uses: where envelopes go, and the journal of its runs."""

    settings: EdgeSettings
    outbound: OutboundPolicy
    journal: Journal
    outbox: Outbox
    scheme: TopicScheme
    metrics: EdgeMetrics
    robot_memory: RobotMemory
    transport: Transport

    def note_robot(self, envelope: Envelope) -> None: ...


class PollerView(Protocol):
    """The poller as the robot commands and the admin routes see it."""

    shop_of: dict[str, str]

    async def run_once(self) -> dict[str, Any]: ...


class PuduHost(Protocol):
    """What the ``pudu.*`` commands and the admin's ``/pudu/*`` routes use."""

    settings: EdgeSettings
    outbound: OutboundPolicy
    journal: Journal

    @property
    def poller(self) -> PollerView: ...


async def agent_of(request: Request) -> Any:
    """The agent whose app this request came to (``app.state.agent``, set with the app);
    each route types it as the narrow view it needs, below."""
    return request.app.state.agent


#: The agent, as the public app's routes see it.
WebhookAgent = Annotated[WebhookHost, Depends(agent_of)]
#: The agent, as the admin listener's ``/metrics`` sees it.
AdminAgent = Annotated[AdminHost, Depends(agent_of)]
#: The agent, as the admin's ``/pudu/*`` routes see it.
PuduAgent = Annotated[PuduHost, Depends(agent_of)]
