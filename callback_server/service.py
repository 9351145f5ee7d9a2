"""The callback server as one long-lived object: store + batch writer + consumer + HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import secrets
import time
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

from bridge import strictjson
from bridge.backoff import backoff_delay
from bridge.commands import CommandClient, CommandOutcome
from bridge.envelope import Envelope
from bridge.errors import InputError, NotFoundError, PayloadError, StoreError, TransportError
from bridge.http.outbound import OutboundPolicy
from bridge.http.server import NodelayStats, make_server
from bridge.proxy import MqttProxy, create_proxy_router
from bridge.proxy.subscriptions import RetryPolicy
from bridge.router import MessageRouter
from bridge.service.health import Readiness
from bridge.service.lifecycle import Listener, serve_service
from bridge.service.sdnotify import Notifier, Watchdog
from bridge.service.settings_loader import mask_url
from bridge.service.taskset import TaskSet
from bridge.service.version import VERSION
from bridge.topic import GATEWAY_CHANNELS, DeviceAddress, every_device_channel, org_root
from bridge.transport import MqttSettings, Transport, create_transport
from callback_server.access import Access, Principal
from callback_server.alerts import (
    AlertDelivery,
    AlertEngine,
    AlertStore,
    AlertSubscriptions,
    load_alert_settings,
)
from callback_server.alerts.rules import AlertSettings
from callback_server.batcher import BatchWriter
from callback_server.console import ConsoleHub
from callback_server.consumer import Consumer
from callback_server.disk import free_space, watched
from callback_server.ingest import confirmations_of
from callback_server.keys import KeyRing
from callback_server.metrics import CallbackMetrics
from callback_server.retention import Retention
from callback_server.settings import CallbackSettings
from callback_server.signed_post import Retry
from callback_server.store import Store, load_targets, open_store
from callback_server.store.schema import (
    COMMAND_TABLE,
    DEAD_TABLE,
    HISTORY_TABLE,
    LOG_TABLE,
    TASKS_TABLE,
    WEBHOOK_DELIVERIES_TABLE,
)
from callback_server.webhooks import routes as webhook_routes
from callback_server.webhooks.service import Webhooks

log = logging.getLogger(__name__)


def mqtt_settings(settings: CallbackSettings) -> MqttSettings:
    """A persistent session with manual acks: unacked messages come back after a crash."""
    return settings.mqtt_settings(
        manual_ack=True,
        receive_maximum=max(settings.batch_max * 2, 100),
    )


class CallbackServer:
    """Owns the long-lived parts; enter it, then serve ``self.app``."""

    def __init__(self, settings: CallbackSettings, transport: Transport | None = None) -> None:
        self.settings = settings
        self.version = VERSION
        self.metrics = CallbackMetrics()
        self.nodelay = NodelayStats()
        targets = load_targets(settings.database_config) if settings.database_config else None
        self.store: Store = open_store(settings.database_url, targets=targets,
                                max_skew=settings.max_clock_skew_seconds)
        self.notifier = Notifier()
        self.watchdog = Watchdog(self.notifier, status=self.status_line)
        self.writer = BatchWriter(self.store, batch_max=settings.batch_max,
                                  beat=self.watchdog.beat("batch-writer"),
                                  pending_max=settings.ingest_pending_max)
        self.transport = transport or create_transport(settings.mqtt_backend,
                                                       mqtt_settings(settings))
        self.router = MessageRouter(self.transport)
        self.watchdog.watch("mqtt-network", lambda: self.transport.last_beat)
        self.consumer = Consumer(
            self.router, self.writer,
            topic_prefix=settings.topic_prefix, share_group=settings.share_group,
        )
        self.gateways: dict[str, dict[str, Any]] = {}
        self.subscribed = False
        self.consumer.gateway_handlers.append(self._on_gateway_message)
        self.outbound = OutboundPolicy(allow=settings.callback_url_allow)
        #: Filesystems whose free space /metrics and /health show (the SQLite default).
        self.disk_paths = watched(settings.database_url)
        self.alert_settings = forwarding(load_alert_settings(settings.alert_rules_file),
                                         settings)
        self.alert_store = AlertStore(self.store)
        # Events by type, alert subscriptions among them (webhooks of style "alert"):
        # the alert delivery's retry policy (FORWARD_* applied).
        d = self.alert_settings.delivery
        self.webhooks = Webhooks.open(self.store, self.outbound,
                                      Retry(d.attempts, d.base_seconds, d.cap_seconds),
                                      d.timeout_seconds)
        self.alert_subscriptions = AlertSubscriptions(self.webhooks.store,
                                                      self.webhooks.delivery.changed)
        self.alert_delivery = AlertDelivery(self.transport, self.webhooks.delivery,
                                            topic_prefix=settings.topic_prefix)
        self.retention = Retention(self.store, {
            LOG_TABLE: settings.log_retention_days,
            DEAD_TABLE: settings.dead_letter_retention_days,
            COMMAND_TABLE: settings.command_retention_days,
            HISTORY_TABLE: settings.history_retention_days,
            TASKS_TABLE: settings.history_retention_days,
            WEBHOOK_DELIVERIES_TABLE: settings.webhook_delivery_retention_days,
        }, interval=settings.retention_interval_seconds,
            pruners={WEBHOOK_DELIVERIES_TABLE: self.webhooks.store.prune})
        self.alerts = AlertEngine(
            self.alert_store, self.alert_settings, self.alert_delivery.submit,
            holder=f"{settings.mqtt_client_id}/{os.getpid()}/{secrets.token_hex(4)}",
            beat=self.watchdog.beat("alerts"))
        self.console = ConsoleHub(self.store)
        self.alert_delivery.listeners.append(self.console.on_transition)

        def committed(items: list[tuple[str, Envelope]]) -> None:
            self.alerts.observe(items)
            self.console.observe(items)
            self.webhooks.source.observe(items)

        self.writer.on_batch = committed
        self.consumer.gateway_handlers.append(self.alerts.on_gateway)
        self.consumer.gateway_handlers.append(self.webhooks.source.on_gateway)
        self.commands = CommandClient(self.transport, settings.topic_prefix)
        token = settings.proxy_token.get_secret_value() if settings.proxy_token else None
        self.keys = KeyRing(settings.api_keys_file, proxy_token=token,
                            callback_token=settings.callback_token.get_secret_value()
                            if settings.callback_token else None)
        self.access = Access(self.keys, self.metrics.auth_refused, settings.topic_prefix)
        self.proxy = MqttProxy(
            self.transport, self.router, token=token,
            allowed_prefixes=settings.proxy_allowed_prefixes or [org_root(settings.topic_prefix)],
            broker=mask_url(settings.mqtt_url),
            outbound=self.outbound,
            # Every org's traffic passes here: no one org or gateway is this service's own.
            device={"service": "callback-server", "org_id": None, "gateway_id": None},
            retry=proxy_retry(settings),
        )
        #: What keeps ``?ready=1`` at 503 besides an unreachable database: the store until
        #: entered (``serve`` adds the listeners); never the broker (HTTP ingest needs none).
        self.readiness = Readiness("store")
        self._stack = AsyncExitStack()
        #: The service's loops: one crashing stops the service (exit 4, systemd restarts).
        self.tasks = TaskSet("callback-server", escalate=True)

        from callback_server.app import create_app

        self.app = create_app(self)
        # Always mounted: each request is checked by key, and with no key configured yet
        # the answer is a 401 saying how to make one (not a 404).
        proxy_api = create_proxy_router(self.proxy, authorize=self.access.proxy_hook())
        assert proxy_api is not None
        self.app.include_router(proxy_api)
        self.app.state.webhooks = self.webhooks
        self.app.include_router(webhook_routes.router)
        self.app.include_router(webhook_routes.router, prefix="/api/v1")

    async def __aenter__(self) -> CallbackServer:
        await self._stack.enter_async_context(self.store)
        self.tasks.spawn(self.writer.run(), "batch-writer")
        self.tasks.spawn(self.retention.run(), "retention")
        await self._stack.enter_async_context(self.router)
        # Routes first: a resumed session delivers what it queued right after CONNACK.
        self.consumer.route()
        self.router.add(self.commands.response_filter, self.commands.on_message)
        await self._stack.enter_async_context(self.transport)
        await self._stack.enter_async_context(self.proxy)
        self.tasks.spawn(self.alerts.run(), "alerts")
        self.tasks.spawn(self.console.run(), "console")
        await self._stack.enter_async_context(self.webhooks.delivery)
        self.tasks.spawn(self.webhooks.delivery.run(), "webhook-delivery")
        self.tasks.spawn(self.webhooks.presence.run(), "gateway-presence")
        # Normally subscribed before serving; a broker that is down or slow to SUBACK
        # must not stop the server, so then it goes on trying in the background.
        subscribing = self.tasks.spawn(self._subscribe(), "subscribe")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(subscribing), 5.0)
        self.readiness.up("store")
        return self

    async def _subscribe(self) -> None:
        """Subscribe, retrying with backoff: a slow broker must not stop the server."""
        # Once connected: a SUBACK, not a filter noted for later, is what "subscribed" means.
        await self.transport.wait_connected()
        # Not shared: the replica that sent a command must hear its response; and every
        # replica must see every gateway's presence and heartbeat (alerts and /gateways
        # depend on them), which a shared subscription would hand to one replica only.
        # The consumer's route matches these too, so they are handled as before.
        filters = [self.commands.response_filter, self.consumer.filter.value]
        if self.settings.share_group:
            filters += [str(self.gateway_filter(channel)) for channel in ("presence", "telemetry")]
        for topic_filter in filters:
            attempt = 0
            while True:
                try:
                    await self.router.subscribe(topic_filter, qos=1)
                    break
                except TransportError as exc:
                    delay = backoff_delay(attempt, 0.5, 30.0)
                    log.warning("subscribing to %s failed (%s); retrying in %.1f s",
                                topic_filter, exc, delay)
                    attempt += 1
                    await asyncio.sleep(delay)
        self.subscribed = True
        log.info("subscribed to %s", self.consumer.filter.value)

    def gateway_filter(self, channel: str) -> str:
        """``{prefix}org/+/device/+/{channel}``, not shared, for a gateway channel."""
        assert channel in GATEWAY_CHANNELS
        return str(every_device_channel(self.settings.topic_prefix, channel))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Ordered: commit and ack what the writer holds while the broker is still there
        # (bounded; what is left stays unacked and is redelivered), stop the writer and the
        # other loops, then the proxy, the transport, the router, and last the store.
        self.readiness.stopping()
        if not await self.writer.drain(5.0):
            log.info("%d messages not committed at stop; the broker redelivers them",
                     self.writer.pending)
        await self.tasks.cancel()  # never raises: a loop that died earlier was logged then
        await self._stack.aclose()

    def _on_gateway_message(self, address: DeviceAddress, payload: bytes) -> None:
        if address.channel == "response":
            self.commands.on_response(payload)  # one pushed by an IoT Rule, not via MQTT
            return
        org, device = address.org_id, address.device_id
        if address.channel == "presence":
            state = payload.decode(errors="replace").strip().lower()[:32]
            gateway = self.gateways.get(f"{org}/{device}", {})
            self.gateways[f"{org}/{device}"] = gateway = {
                **gateway, "org_id": org, "gateway_id": device, "state": state,
                "since": time.time()}
        elif address.channel == "telemetry":
            gateway = self.gateways.setdefault(f"{org}/{device}", {
                "org_id": org, "gateway_id": device, "state": "unknown", "since": None})
            now = time.time()
            fields = heartbeat_fields(payload)
            # the gateway's clock against ours (+ ahead), from the heartbeat's timestamp:
            # what an operator compares with gateway_clock_offset_s, its robots' verdict
            sent = fields.pop("timestamp", None)
            gateway.update(fields, heartbeat_at=now,
                           clock_offset_s=None if sent is None else round(sent - now))
        else:
            return
        self.console.on_gateway(gateway)

    def org_of(self, device_id: str, caller: Principal | None = None) -> str:
        """The org a gateway announced itself under (among the orgs ``caller`` covers);
        NotFoundError if none the caller may see, InputError if ambiguous."""
        orgs = {g["org_id"] for g in self.gateways.values() if g["gateway_id"] == device_id
                and (caller is None or caller.covers(g["org_id"]))}
        if not orgs and caller is not None and not caller.all_orgs:
            raise NotFoundError(f"gateway {device_id} not found")
        if len(orgs) != 1:
            raise InputError(
                f"org of {device_id!r} is {'ambiguous' if orgs else 'unknown'}; pass org_id",
                field="org_id",
            )
        return str(orgs.pop())

    async def record_command(self, outcome: CommandOutcome, key_name: str | None = None) -> None:
        """Keep the command, its outcome, round-trip time and the name of the key that sent
        it; a database hiccup is logged."""
        try:
            await self.store.record_command(outcome, key_name)
        except StoreError as exc:
            log.warning("could not record command %s: %s", outcome.command.message_id, exc)

    def stall(self) -> str | None:
        """Why the stream counts as stalled, or None: operators must never read
        ``healthy`` over a stream that stopped."""
        bound = self.settings.stall_seconds
        oldest = self.consumer.oldest_unacked_seconds()
        if oldest > bound:
            return (f"the oldest unacknowledged message has waited {oldest:.0f} s "
                    f"(STALL_SECONDS={bound:g})")
        waited = self.writer.stalled_seconds()
        if waited > bound:
            return (f"{self.writer.pending} messages waiting and nothing committed for "
                    f"{waited:.0f} s (STALL_SECONDS={bound:g})")
        return None

    def clock_resets(self) -> int:
        """Robot clock resets the store's ordering rule confirmed (bridge/clock.py)."""
        clocks = getattr(self.store, "clocks", None)  # a SQL store's; a plug-in may have none
        return int(clocks.resets) if clocks is not None else 0

    async def health(self) -> dict[str, Any]:
        try:  # a database that hangs (not refuses) must not hang the health check too
            db_ok = await asyncio.wait_for(self.store.ping(), 2.0)
        except TimeoutError:
            db_ok = False
        connected = self.transport.connected
        stall = self.stall()
        reasons = [reason for bad, reason in (
            (not connected, "broker not connected"),
            (connected and not self.subscribed, "not subscribed yet"),
            # a full disk (the SQLite default on a small card) is named: a reachable
            # database does not show it otherwise (no other error text: reasons are
            # shown to callers without a key)
            (not db_ok or self.writer.degraded, "database unavailable" + (
                ": database or disk is full" if "is full" in self.writer.last_error
                else "")),
            (stall is not None, stall),
        ) if bad]
        # Ready: can take traffic. The broker is not asked (HTTP ingest and the read API
        # work without it); a database that cannot be reached is.
        not_ready = self.readiness.reasons() + ([] if db_ok else ["database unreachable"])
        return {
            "status": "degraded" if reasons else "healthy",
            "reasons": reasons,
            "timestamp": int(time.time()),
            "service": "callback-server",
            "version": self.version,
            "ready": not not_ready,
            "not_ready": not_ready,
            "broker_connected": connected,
            "database_ok": db_ok and not self.writer.degraded,
            "database_error": self.writer.last_error or None,
            "pending": self.writer.pending,
            "unacked": self.consumer.unacked,
            # rounded up: a wait just past STALL_SECONDS never reads as the bound itself
            "oldest_unacked_seconds": math.ceil(self.consumer.oldest_unacked_seconds() * 1000)
            / 1000,
            "clock_skewed": self.writer.skewed,
            "robot_clock_resets": self.clock_resets(),
            "received": self.consumer.received,
            "stored": self.writer.stored,
            "duplicates": self.writer.duplicates,
            "handled": self.consumer.handled,
            "dead_lettered": self.writer.dead_lettered,
            "ingest_pending": self.writer.held,
            "ingest_pending_max": self.writer.pending_max,
            "pruned": self.retention.pruned,
            "free_bytes": free_space(self.disk_paths),
            "alerts": {"transitions": self.alerts.transitions, "sweeps": self.alerts.sweeps,
                       "evaluating": self.alerts.pending,
                       "delivering": self.alert_delivery.pending,
                       "delivered": self.alert_delivery.delivered,
                       "undelivered": self.alert_delivery.failed},
            "webhooks": {"delivering": self.webhooks.delivery.pending,
                         "delivered": self.webhooks.delivery.delivered["event"],
                         "undelivered": self.webhooks.delivery.failed["event"]},
            "subscription": self.consumer.filter.value,
            "subscribed": self.subscribed,
            "tcp_nodelay_verified": self.nodelay.verified,
            "tcp_nodelay": dataclasses.asdict(self.nodelay),
            # AWS IoT rule destinations waiting for the operator to confirm them
            "iot_destination_confirmations": confirmations_of(self.app).pending(),
        }

    def end_streams(self) -> None:
        """Stopping: ``?ready=1`` answers 503 from now (a load balancer stops sending
        while in-flight requests finish); every open SSE response (the proxy's and the
        console's) ends."""
        self.readiness.stopping()
        self.proxy.end_streams()
        self.console.end_streams()

    def status_line(self) -> str:
        """systemd's STATUS=: what ``systemctl status`` shows an operator at a glance."""
        broker = "connected" if self.transport.connected else "broker away"
        db = "database away" if self.writer.degraded else "database ok"
        return (f"{broker}; {db}; {self.writer.stored} stored, {self.writer.pending} pending, "
                f"oldest unacked {self.consumer.oldest_unacked_seconds():.0f} s")

    def refresh_gauges(self) -> None:
        m = self.metrics
        m.received.set(self.consumer.received)
        m.stored.set(self.writer.stored)
        m.batches.set(self.writer.batches)
        m.duplicates.set(self.writer.duplicates)
        m.handled.set(self.consumer.handled)
        m.dead.set(self.writer.dead_lettered)
        for reason, count in self.writer.counts.by_reason.items():
            m.dead_by_reason.labels(reason=reason.value).set(count)
        m.pending.set(self.writer.pending)
        m.ingest_held.set(self.writer.held)
        m.ingest_full.set(self.writer.refused_full)
        m.oldest_unacked.set(self.consumer.oldest_unacked_seconds())
        m.skewed.set(self.writer.skewed)
        m.clock_resets.set(self.clock_resets())
        m.degraded.set(1 if self.writer.degraded else 0)
        m.connected.set(1 if self.transport.connected else 0)
        for table, count in self.retention.pruned.items():
            m.pruned.labels(table=table).set(count)
        for name, free in free_space(self.disk_paths).items():
            if free is not None:
                m.free_bytes.labels(path=name).set(free)


#: A heartbeat's fields /gateways and the console show, and those of its last poll run.
_BEAT = ("outbox_depth", "outbox_oldest_age_s", "broker_connected", "gateway_clock_offset_s",
         "robot_clock_resets")
_RUN = ("run_id", "status", "started_at", "ended_at", "robots_seen", "errors", "error")


def heartbeat_fields(payload: bytes) -> dict[str, Any]:
    """The backlog and last poll run of a gateway heartbeat (outside data: parsed strictly,
    only scalars kept); nothing if it is not a JSON object."""
    try:
        beat = strictjson.loads(payload).value
    except PayloadError:
        return {}
    if not isinstance(beat, dict):
        return {}

    def scalars(obj: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        return {k: v for k in names if isinstance(v := obj.get(k), str | int | float | bool)
                and not (isinstance(v, str) and len(v) > 200)}

    poll = beat.get("poll")
    run = poll.get("last_run") if isinstance(poll, dict) else None
    sent = beat.get("timestamp")
    sent = float(sent) if isinstance(sent, int | float) and not isinstance(sent, bool) \
        and math.isfinite(sent) else None
    return {**scalars(beat, _BEAT), "timestamp": sent, "last_run": scalars(run, _RUN)
            if isinstance(run, dict) else None}


def forwarding(alerts: AlertSettings, settings: CallbackSettings) -> AlertSettings:
    """FORWARD_TIMEOUT / FORWARD_MAX_RETRIES, when set, over the rules file's delivery."""
    changed: dict[str, Any] = {}
    if settings.forward_timeout is not None:
        changed["timeout_seconds"] = settings.forward_timeout
    if settings.forward_max_retries is not None:
        changed["attempts"] = settings.forward_max_retries + 1
    if not changed:
        return alerts
    return alerts.model_copy(update={"delivery": alerts.delivery.model_copy(update=changed)})


def proxy_retry(settings: CallbackSettings) -> RetryPolicy:
    """The callback_url delivery policy, with FORWARD_TIMEOUT / FORWARD_MAX_RETRIES if set."""
    return RetryPolicy.forwarding(settings.forward_timeout, settings.forward_max_retries)


async def serve(settings: CallbackSettings) -> None:
    """Run until SIGTERM/SIGINT (bridge.service.lifecycle: bind, READY=1, ordered stop)."""
    server = CallbackServer(settings)

    def listeners() -> list[Listener]:
        s = settings
        return [Listener("callback server", s.http_host, s.http_port,
                         make_server(server.app, s.http_host, s.http_port, server.nodelay,
                                     s.http_limits), reuse_port=s.http_reuse_port)]

    log.info("callback server %s starting, consuming %s", VERSION, server.consumer.filter.value)
    server.readiness.expect("listeners")
    await serve_service(server, listeners, notifier=server.notifier, watchdog=server.watchdog,
                        status=server.status_line, end_streams=server.end_streams,
                        reload=server.keys.reload, tasks=server.tasks,
                        on_ready=lambda: server.readiness.up("listeners"))
