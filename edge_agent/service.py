"""The edge agent as one long-lived object: outbox + transport + publisher + HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bridge.clock import GatewayClock, RobotClocks
from bridge.commands import CommandExecutor
from bridge.envelope import Envelope
from bridge.errors import TransportError
from bridge.http.api_docs import install_docs
from bridge.http.error_boundary import describe_errors
from bridge.http.error_boundary import install as install_error_handlers
from bridge.http.outbound import OutboundPolicy
from bridge.http.server import NodelayStats, make_server
from bridge.outbox import Outbox
from bridge.proxy import MqttProxy, RetryPolicy, create_proxy_router
from bridge.router import MessageRouter
from bridge.service.health import Readiness
from bridge.service.lifecycle import Listener, serve_service
from bridge.service.sdnotify import Notifier, Watchdog
from bridge.service.settings_loader import mask_url
from bridge.service.taskset import TaskSet
from bridge.service.version import VERSION
from bridge.topic import BATCH_CHANNEL, TopicScheme, org_root
from bridge.transport import MqttSettings, Transport, Will, create_transport
from edge_agent import admin as admin_routes
from edge_agent.builtin_commands import BUILTIN_NAMES, register_builtins
from edge_agent.downsample import Downsampler
from edge_agent.forwarding import ForwardPolicy
from edge_agent.journal import Journal
from edge_agent.metrics import EdgeMetrics
from edge_agent.plugins import register_plugins
from edge_agent.publisher import OutboxPublisher
from edge_agent.pudu.poller import Poller
from edge_agent.pudu.robot_commands import register_pudu
from edge_agent.robot_memory import RobotMemory
from edge_agent.settings import EdgeSettings

#: The public listener's routes, which the admin app's docs also describe: no proxy token.
WEBHOOK_PATHS = ("/api/pudu/webhook", "/api/pudu/webhook/health")

log = logging.getLogger(__name__)


def mqtt_settings(settings: EdgeSettings, scheme: TopicScheme) -> MqttSettings:
    """Broker session for the gateway: persistent, with presence as will and birth."""
    presence = str(scheme.device(settings.gateway_id, "presence"))
    return settings.mqtt_settings(
        max_inflight=settings.publish_window,
        will=Will(presence, b"offline", qos=1, retain=True),
        birth=Will(presence, b"online", qos=1, retain=True),
        offline=Will(presence, b"offline", qos=1, retain=True),
    )


def forward_retry(settings: EdgeSettings) -> RetryPolicy:
    """The callback_url delivery policy: FORWARD_TIMEOUT / FORWARD_MAX_RETRIES."""
    return RetryPolicy.forwarding(settings.forward_timeout, settings.forward_max_retries)


class EdgeAgent:
    """Owns the long-lived parts; enter it, then serve ``self.app``."""

    def __init__(self, settings: EdgeSettings, transport: Transport | None = None) -> None:
        self.settings = settings
        self.version = VERSION
        self.scheme = TopicScheme(settings.org_id, settings.topic_prefix)
        self.metrics = EdgeMetrics()
        self.outbox = Outbox(
            settings.outbox_path,
            max_entries=settings.outbox_max_entries,
            dedup_ttl=settings.dedup_ttl_seconds,
        )
        self.transport = transport or create_transport(
            settings.mqtt_backend, mqtt_settings(settings, self.scheme)
        )
        self.notifier = Notifier()
        self.watchdog = Watchdog(self.notifier, status=self.status_line)
        self.watchdog.watch("mqtt-network", lambda: self.transport.last_beat)
        self.publisher = OutboxPublisher(
            self.outbox, self.transport,
            window=settings.publish_window, rate_limit=settings.publish_limits()[0],
            byte_limit=settings.publish_limits()[1],
            frame_topic=str(self.scheme.device(settings.gateway_id, BATCH_CHANNEL))
            if settings.batch_frames != "off" else None,
            frame_live=settings.batch_frames == "always",
            ack_timeout=settings.publish_ack_timeout_seconds,
            beat=self.watchdog.beat("publisher"),
        )
        self.policy = ForwardPolicy.of(settings)
        self.downsampler = Downsampler(
            self.outbox, self.policy.intervals,
            beat=self.watchdog.beat("downsampler") if self.policy.intervals else lambda: None,
        )
        self.router = MessageRouter(self.transport)
        self.outbound = OutboundPolicy(allow=settings.callback_url_allow)
        # Run records and durable command ids, in the outbox database.
        self.journal = Journal(settings.outbox_path)
        self.poller = Poller(self)
        # Command answers and the proxy's publishes share the publisher's pacing: AWS IoT
        # Core counts every publish of the connection, not only the outbox's.
        self.commands = CommandExecutor(self.transport, self.scheme, settings.gateway_id,
                                        pace=self.publisher.pace)
        self.commands.journal = self.journal
        register_builtins(self.commands, self)
        register_pudu(self.commands, self)
        # After the built-ins: ConfigError if a plug-in would shadow one or cannot load.
        self.plugins = register_plugins(self.commands, settings, BUILTIN_NAMES)
        token = settings.proxy_token.get_secret_value() if settings.proxy_token else None
        own_subtree = org_root(settings.topic_prefix, settings.org_id)
        self.proxy = MqttProxy(
            self.transport, self.router, token=token,
            allowed_prefixes=settings.proxy_allowed_prefixes or [own_subtree],
            broker=mask_url(settings.mqtt_url),
            outbound=self.outbound,
            device={"service": "edge-agent", "org_id": settings.org_id,
                    "gateway_id": settings.gateway_id},
            retry=forward_retry(settings),
            pace=self.publisher.pace,
        )
        self.started = time.time()
        #: What keeps ``?ready=1`` at 503: the outbox until entered (``serve`` adds the
        #: listeners); never the broker, as webhooks go to the outbox while it is away.
        self.readiness = Readiness("outbox")
        #: False for ``edge-agent poll --once`` run without an agent: one run, no schedule.
        self.schedule_polls = True
        self.robots: dict[str, dict[str, Any]] = {}
        # Per-robot state is forgotten once a robot is quiet (bounded memory on the edge).
        # A robot the poller still lists is heard of on every run: never quieter than that.
        quiet = settings.robot_quiet_seconds
        if self.poller.enabled:
            quiet = max(quiet, 2 * settings.pudu.poll_interval_seconds)
        self.robot_memory = RobotMemory(quiet)
        self.robot_memory.hold("robots", lambda sn: self.robots.pop(sn, None),
                               lambda: len(self.robots))
        self.robot_memory.hold("downsampler", self.downsampler.forget,
                               lambda: len(self.downsampler))
        self.robot_memory.hold("poller", self.poller.forget_robot, lambda: len(self.poller))
        # the ordering rule (bridge/clock.py) and the check of this gateway's own clock
        self.clocks = RobotClocks(settings.max_clock_skew_seconds)
        self.gateway_clock = GatewayClock(settings.max_clock_skew_seconds)
        self.robot_memory.hold("clocks", self.clocks.forget, lambda: len(self.clocks))
        self.nodelay = NodelayStats()
        self._stack = AsyncExitStack()
        #: The agent's loops: one crashing stops the agent (exit 4, systemd restarts it).
        self.tasks = TaskSet("edge-agent", escalate=True)

        from edge_agent.webhook import create_app

        self.app = create_app(self)
        self.admin_app = self._admin_app()

    def _admin_app(self) -> FastAPI:
        """The admin listener (localhost by default): /metrics, /docs, and the REST MQTT
        proxy when PROXY_TOKEN is set. Its docs describe the public webhook too."""
        app = FastAPI(title="Pudu edge agent", version=self.version, docs_url=None,
                      redoc_url=None)
        install_docs(app)
        install_error_handlers(app, common=(401,), public=WEBHOOK_PATHS)
        api = create_proxy_router(self.proxy)
        if api is not None:
            app.include_router(api)
        if self.settings.pudu.configured:
            from edge_agent.pudu.admin import router as poll_router

            app.include_router(poll_router)
        app.include_router(admin_routes.router)
        app.state.agent = self

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                app.openapi_schema = describe_errors(get_openapi(
                    title=app.title, version=app.version,
                    routes=[*self.app.routes, *app.routes]), (401,), WEBHOOK_PATHS)
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]
        return app

    async def __aenter__(self) -> EdgeAgent:
        await self._stack.enter_async_context(self.outbox)
        # Held for downsampling when the last run stopped (or died): their intervals are
        # over, and a 200 was given for each.
        released = await self.outbox.release_all()
        if released:
            log.info("released %d messages held for downsampling before the restart", released)
        await self._stack.enter_async_context(self.journal)
        await self._stack.enter_async_context(self.router)
        # Route and subscribe before connecting: a resumed session delivers queued commands
        # at once, and the subscription goes out ahead of our "online" on every connect.
        self.router.add(self.commands.command_topic, self.commands.on_message)
        await self.router.subscribe(self.commands.command_topic, qos=1)
        await self._stack.enter_async_context(self.transport)
        await self._stack.enter_async_context(self.proxy)
        self.transport.add_connection_listener(
            lambda up: self.metrics.broker_connected.set(1 if up else 0)
        )
        self.tasks.spawn(self.publisher.run(), "outbox-publisher")
        if self.downsampler.enabled:
            self.tasks.spawn(self.downsampler.run(), "downsampler")
        if self.settings.heartbeat_seconds > 0:
            self.tasks.spawn(self._heartbeat(), "heartbeat")
        self.tasks.spawn(self.robot_memory.run(), "robot-memory")
        if self.poller.enabled and self.schedule_polls:
            self.tasks.spawn(self.poller.run(), "pudu-poller")
        self.readiness.up("outbox")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Ordered: stop publishing, let what is in flight be acked and running commands
        # answer, then the proxy, the transport (which publishes `offline`), the outbox.
        self.readiness.stopping()
        await self.tasks.cancel()  # never raises: a loop that died earlier was logged then
        await self.publisher.settle(2.0)
        await self.commands.aclose(5.0)
        await self._stack.aclose()

    def end_streams(self) -> None:
        """Stopping: ``?ready=1`` answers 503 from now (a load balancer stops sending
        while in-flight requests finish), and open SSE streams end."""
        self.readiness.stopping()
        self.proxy.end_streams()

    def note_robot(self, envelope: Envelope) -> None:
        """Remember the newest state per robot for ``get_robots`` (bounded by fleet size).

        A webhook's state also makes the poller forget what it published for the fields
        the webhook set: the cloud now holds the webhook's value, so the next poll must
        republish the API's state even if it equals the poller's last one."""
        self.robot_memory.heard(envelope.device)
        if envelope.source != "poll":
            self.poller.forget(envelope.device, envelope.data)
        state = self.robots.setdefault(envelope.device, {"sn": envelope.device})
        if envelope.ts >= state.get("ts", 0):
            state.update(envelope.data)
            state["ts"] = envelope.ts
            state["last_type"] = envelope.type

    def health(self) -> dict[str, Any]:
        """Also the heartbeat's body. Degraded, with the reasons, while the broker is away
        or the outbox cannot write; the watchdog keeps pinging either way (a restart would
        free no disk, and the outbox's writer recovers by itself)."""
        connected = self.transport.connected
        unwritable = self.outbox.unwritable
        reasons = [reason for bad, reason in (
            (not connected, "broker not connected"),
            (unwritable is not None, f"outbox cannot write: {unwritable}"),
            (self.gateway_clock.wrong, f"gateway clock is {-self.gateway_clock.offset:+.0f} s "
             "off its robots' clocks (their times are used)"),
        ) if bad]
        return {
            "status": "degraded" if reasons else "healthy",
            "reasons": reasons,
            "timestamp": int(time.time()),
            "service": "edge-agent",
            "version": self.version,
            "org_id": self.settings.org_id,
            "gateway_id": self.settings.gateway_id,
            "broker_connected": connected,
            "outbox_depth": self.outbox.depth,
            "outbox_max_entries": self.outbox.max_entries,
            "outbox_rejected": self.outbox.rejected,
            "outbox_held": self.outbox.held,
            "outbox_writable": unwritable is None,
            "outbox_error": unwritable,
            "outbox_free_bytes": self.outbox.free_bytes(),
            "outbox_oldest_age_s": round(self.outbox.oldest_age_s, 1),
            "drain_estimate_s": _rounded(self.publisher.drain_estimate_s()),
            "inflight": self.publisher.inflight,
            "published": self.publisher.published,
            "publish_throttled_s": round(self.publisher.throttled_s, 1),
            "draining": self.publisher.draining,
            "uptime_seconds": round(time.time() - self.started, 1),
            "robot_states": self.robot_memory.states(),
            # + the gateway clock is ahead of its robots', - behind (0: not found wrong)
            "gateway_clock_offset_s": round(-self.gateway_clock.offset, 1),
            "robot_clock_resets": self.clocks.resets,
            "poll": self.poll_health(),
            "ready": self.readiness.ready,
            "not_ready": self.readiness.reasons(),
        }

    def status_line(self) -> str:
        """systemd's STATUS=: what ``systemctl status`` shows an operator at a glance."""
        broker = "connected" if self.transport.connected else "broker away"
        if self.outbox.unwritable:
            broker += f"; OUTBOX CANNOT WRITE ({self.outbox.unwritable})"
        drain = self.publisher.drain_estimate_s()
        eta = "" if not self.outbox.depth else (
            "; not draining" if drain is None else f"; drained in ~{drain:.0f} s")
        stalled = self.publisher.stalled_for()
        if stalled > self.publisher.ack_timeout:
            broker += f", no PUBACK for {stalled:.0f} s"
        return (f"{broker}; outbox {self.outbox.depth} entries, oldest "
                f"{self.outbox.oldest_age_s:.0f} s{eta}; {self.publisher.published} published")

    def poll_health(self) -> dict[str, Any]:
        """The poller's state and its last run record (None before the first run)."""
        return {"enabled": self.poller.enabled, "running": self.poller.running,
                "interval_seconds": self.settings.pudu.poll_interval_seconds,
                "runs": self.poller.runs, "last_run": self.poller.last,
                "next_run": self.poller.next_run, "schedule_ended": self.poller.ended}

    def refresh_gauges(self) -> None:
        self.metrics.outbox_depth.set(self.outbox.depth)
        self.metrics.outbox_rejected.set(self.outbox.rejected)
        self.metrics.outbox_held.set(self.outbox.held)
        free = self.outbox.free_bytes()
        if free is not None:
            self.metrics.outbox_free_bytes.set(free)
        self.metrics.outbox_writable.set(0 if self.outbox.unwritable else 1)
        self.metrics.outbox_commits.set(self.outbox.commits)
        self.metrics.gateway_clock_offset.set(-self.gateway_clock.offset)
        self.metrics.outbox_oldest_age.set(self.outbox.oldest_age_s)
        drain = self.publisher.drain_estimate_s()
        self.metrics.outbox_drain_estimate.set(math.inf if drain is None else drain)
        self.metrics.published.set(self.publisher.published)
        self.metrics.frames.set(self.publisher.frames)
        self.metrics.broker_connected.set(1 if self.transport.connected else 0)
        for holder, size in self.robot_memory.states().items():
            self.metrics.robot_states.labels(holder).set(size)

    async def _heartbeat(self) -> None:
        """Telemetry at QoS 0: a missed heartbeat is not worth a resend."""
        topic = str(self.scheme.device(self.settings.gateway_id, "telemetry"))
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            if self.transport.connected:
                payload = json.dumps(self.health()).encode()
                await self.publisher.pace(topic, payload)
                try:
                    await self.transport.publish(topic, payload, qos=0)
                except TransportError as exc:
                    log.debug("heartbeat not sent: %s", exc)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def serve(settings: EdgeSettings) -> None:
    """Run until SIGTERM/SIGINT (bridge.service.lifecycle: bind, READY=1, ordered stop)."""
    agent = EdgeAgent(settings)

    def listeners() -> list[Listener]:
        s = settings
        proxy = ", REST MQTT proxy" if agent.proxy.enabled else ""
        return [
            Listener("webhook", s.http_host, s.http_port,
                     make_server(agent.app, s.http_host, s.http_port, agent.nodelay,
                                 s.http_limits)),
            Listener(f"admin (/metrics, /docs{proxy})", s.admin_host, s.admin_port,
                     make_server(agent.admin_app, s.admin_host, s.admin_port, agent.nodelay,
                                 s.http_limits)),
        ]

    log.info("edge agent %s starting (org %s, gateway %s)", VERSION, settings.org_id,
             settings.gateway_id)
    agent.readiness.expect("listeners")
    await serve_service(agent, listeners, notifier=agent.notifier, watchdog=agent.watchdog,
                        status=agent.status_line, end_streams=agent.end_streams,
                        on_ready=lambda: agent.readiness.up("listeners"), tasks=agent.tasks)
