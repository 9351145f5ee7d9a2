"""Prometheus metrics of one callback server (own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from callback_server.access import REFUSAL_REASONS
from callback_server.batcher import Reason

__all__ = ["CallbackMetrics"]


class CallbackMetrics:
    """Gauges refreshed on scrape from the components' own counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=self.registry)

        self.received = gauge("callback_messages_received_total", "MQTT messages received")
        self.stored = gauge("callback_messages_stored_total", "Messages committed (new)")
        self.duplicates = gauge("callback_messages_duplicate_total",
                                "Messages already stored (a retry or redelivery)")
        self.handled = gauge("callback_messages_handled_total",
                             "Gateway traffic handled (presence, telemetry, response, ...)")
        self.batches = gauge("callback_batches_total", "Store transactions")
        self.dead = gauge("callback_dead_letters_total", "Messages dead-lettered")
        self.dead_by_reason = Gauge("callback_dead_letters_by_reason",
                                    "Messages dead-lettered, by reason", ["reason"],
                                    registry=self.registry)
        for kind in Reason:
            self.dead_by_reason.labels(reason=kind.value)
        self.pending = gauge("callback_pending", "Messages waiting for a commit")
        self.ingest_held = gauge("callback_ingest_pending",
                                 "HTTP ingest messages waiting for a commit (capped)")
        self.ingest_full = gauge("callback_ingest_refused_full_total",
                                 "HTTP ingest requests answered 503: INGEST_PENDING_MAX reached")
        self.oldest_unacked = gauge("callback_oldest_unacked_seconds",
                                    "Age of the oldest MQTT message not yet acknowledged")
        self.skewed = gauge("callback_clock_skewed_total",
                            "Messages whose robot time was too far ahead (ordered by now)")
        self.clock_resets = gauge("callback_robot_clock_resets_total",
                                  "Robot clocks seen reset (a time before 2017) or going "
                                  "back and staying there")
        self.degraded = gauge("callback_degraded", "1 while database writes fail")
        self.connected = gauge("callback_broker_connected", "1 when connected to the broker")
        self.pruned = Gauge("callback_rows_pruned_total", "Rows deleted by retention",
                            ["table"], registry=self.registry)
        self.free_bytes = Gauge("callback_free_bytes",
                                "Free bytes on the filesystem of the SQLite database "
                                "(path=database) and of the data directory (path=data)",
                                ["path"], registry=self.registry)
        self.pudu_webhooks = Counter("callback_pudu_webhooks",
                                     "Pudu webhooks taken by this server, by outcome",
                                     ["outcome"], registry=self.registry)
        self.auth_refused = Counter("callback_auth_refused", "Requests refused by key checks",
                                    ["reason"], registry=self.registry)
        for reason in REFUSAL_REASONS:
            self.auth_refused.labels(reason=reason)
