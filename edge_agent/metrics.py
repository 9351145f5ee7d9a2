"""Prometheus metrics of one edge agent (own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class EdgeMetrics:
    """The counters an operator watches: accepted, duplicates, rejected, backlog."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # type: the documented callback types, anything else (or unparsed) as "other",
        # so the series stay bounded whatever senders put there.
        self.webhooks = Counter(
            "edge_webhooks_total", "Webhook callbacks by outcome and callback type",
            ["outcome", "type"],
            registry=self.registry,
        )
        # Answered 200 and counted under edge_webhooks_total{outcome="dropped"} when
        # DROP_TYPES or FORWARD_CHANNELS keep them home; these were downsampled away.
        self.downsampled = Counter(
            "edge_downsampled_total",
            "Callbacks superseded within their MIN_INTERVAL_SECONDS (answered 200, "
            "a newer one of the same robot published instead)", ["channel"],
            registry=self.registry,
        )
        self.outbox_held = Gauge(
            "edge_outbox_held", "Messages held for the end of their downsampling interval",
            registry=self.registry,
        )
        self.accept_seconds = Histogram(
            "edge_webhook_accept_seconds", "Time to durable accept (outbox commit)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.clock_skew = Counter(
            "edge_clock_skew_total",
            "Callbacks whose robot time was too far ahead; ordered by received_at instead",
            registry=self.registry,
        )
        self.clock_resets = Counter(
            "edge_robot_clock_resets_total",
            "Robot clocks seen reset (a time before 2017) or going back and staying there "
            "(bridge/clock.py)",
            registry=self.registry,
        )
        self.gateway_clock_offset = Gauge(
            "edge_gateway_clock_offset_seconds",
            "This gateway's clock against its robots' (+ ahead, - behind; 0: not wrong)",
            registry=self.registry,
        )
        self.outbox_depth = Gauge(
            "edge_outbox_depth", "Entries waiting for PUBACK", registry=self.registry
        )
        self.outbox_oldest_age = Gauge(
            "edge_outbox_oldest_age_seconds", "How long the oldest outbox entry has waited",
            registry=self.registry,
        )
        # +Inf while entries wait and nothing is being published (broker away): an alert
        # on "drained in more than N s" fires then too; 0 when the outbox is empty.
        self.outbox_drain_estimate = Gauge(
            "edge_outbox_drain_estimate_seconds",
            "Seconds to empty the outbox at the recent publish rate",
            registry=self.registry,
        )
        self.outbox_free_bytes = Gauge(
            "edge_outbox_free_bytes",
            "Free space on the outbox's filesystem (what SQLite may still grow into)",
            registry=self.registry,
        )
        self.outbox_commits = Gauge(
            "edge_outbox_commits_total",
            "Outbox transactions committed since start, each an fsync of its disk",
            registry=self.registry,
        )
        self.outbox_writable = Gauge(
            "edge_outbox_writable",
            "0 while the outbox cannot write (disk full or failing): callbacks get 503",
            registry=self.registry,
        )
        self.robot_states = Gauge(
            "edge_robot_states",
            "Entries kept in memory per robot, by holder (dropped after ROBOT_QUIET_SECONDS)",
            ["holder"], registry=self.registry,
        )
        self.outbox_rejected = Gauge(
            "edge_outbox_rejected", "Entries the broker refused for good, set aside",
            registry=self.registry,
        )
        self.broker_connected = Gauge(
            "edge_broker_connected", "1 when connected to the broker", registry=self.registry
        )
        self.poll_runs = Counter(
            "edge_poll_runs_total", "Pudu cloud reconciliation runs by status", ["status"],
            registry=self.registry,
        )
        self.poll_api_calls = Counter(
            "edge_poll_api_calls_total", "Pudu API calls made by poll runs (attempts)",
            registry=self.registry,
        )
        self.poll_api_retries = Counter(
            "edge_poll_api_retries_total", "Pudu API calls retried (5xx, timeout, 429)",
            registry=self.registry,
        )
        self.poll_published = Counter(
            "edge_poll_envelopes_total", "Envelopes published by poll runs",
            registry=self.registry,
        )
        self.poll_last_run = Gauge(
            "edge_poll_last_run_timestamp_seconds", "When the last poll run ended",
            registry=self.registry,
        )
        self.published = Gauge(
            "edge_published_total", "Messages acknowledged by the broker since start",
            registry=self.registry,
        )
        self.frames = Gauge(
            "edge_batch_frames_total", "Batch frames sent since start (BATCH_FRAMES): each "
            "one publish of many envelopes, counted once in edge_published_total",
            registry=self.registry,
        )
