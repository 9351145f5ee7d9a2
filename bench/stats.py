"""The figures the bench reports, the targets they are judged by, and their aggregation.

Every scenario returns one ``{figure key: value}`` per repetition; ratios are computed
inside each repetition (subject and baseline measured minutes apart on the same
machine state) and only then aggregated: median, min and max over the repetitions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Figure:
    key: str
    label: str
    unit: str


@dataclass(frozen=True, slots=True)
class Target:
    number: str
    text: str
    key: str
    op: str  # ">=" or "<="
    threshold: float


@dataclass(frozen=True, slots=True)
class Summary:
    median: float
    low: float
    high: float
    values: tuple[float, ...]


def _f(key: str, label: str, unit: str) -> Figure:
    return Figure(key, label, unit)


FIGURES: tuple[Figure, ...] = (
    # 1. edge ingest
    _f("ingest.starlette_rps", "Starlette echo (baseline)", "req/s"),
    _f("ingest.starlette_cpu_us", "Starlette echo CPU per request", "µs"),
    _f("ingest.fastapi_rps", "FastAPI + pydantic echo (baseline)", "req/s"),
    _f("ingest.fastapi_cpu_us", "FastAPI echo CPU per request", "µs"),
    _f("ingest.naive_forward_rps", "naive_forward answered (baseline)", "req/s"),
    _f("ingest.naive_forward_delivered_pct", "naive_forward answers that reached the broker",
       "%"),
    _f("ingest.edge_accepts", "edge durable accepts, saturated", "accepts/s"),
    _f("ingest.edge_cpu_us", "edge CPU per accept (incl. publishing)", "µs"),
    _f("ingest.edge_p99_saturated_ms", "edge p99 at saturation (wrk)", "ms"),
    _f("ingest.edge_fixed_rate", "edge fixed offered rate (latency_load x max)", "req/s"),
    _f("ingest.edge_p50_ms", "edge p50 accept latency at the fixed rate", "ms"),
    _f("ingest.edge_p99_ms", "edge p99 accept latency at the fixed rate", "ms"),
    _f("ingest.fastapi_p99_ms", "FastAPI echo p99 at the same fixed rate (control)", "ms"),
    _f("ingest.edge_duplicates", "edge answers marked duplicate", "count"),
    _f("ingest.edge_rss_after_mb", "edge RSS after the ingest runs", "MiB"),
    _f("ingest.edge_vs_fastapi", "edge accepts / FastAPI echo", "x"),
    _f("ingest.edge_vs_starlette", "edge accepts / Starlette echo", "x"),
    _f("ingest.edge_vs_naive_forward", "edge accepts / naive_forward answered", "x"),
    _f("ingest.frames_accepts", "edge durable accepts, saturated, BATCH_FRAMES=always",
       "accepts/s"),
    _f("ingest.frames_cpu_us", "edge CPU per accept, BATCH_FRAMES=always", "µs"),
    _f("ingest.frames_publishes_per_100", "edge publishes per 100 accepts, BATCH_FRAMES=always",
       "count"),
    _f("ingest.frames_vs_fastapi", "edge accepts / FastAPI echo, BATCH_FRAMES=always", "x"),
    _f("ingest.frames_vs_starlette", "edge accepts / Starlette echo, BATCH_FRAMES=always", "x"),
    # 2. whole pipeline
    _f("pipeline.naive_webhook_rps", "naive_webhook upserts committed (baseline)", "rows/s"),
    _f("pipeline.naive_webhook_cpu_us", "naive_webhook CPU per request (app only)", "µs"),
    _f("pipeline.accepts", "pipeline: edge accepts while saturated", "accepts/s"),
    _f("pipeline.sustained", "pipeline: callbacks committed to MariaDB, sustained", "rows/s"),
    _f("pipeline.drain_lag_s", "pipeline: rows still arriving after load stopped", "s"),
    _f("pipeline.vs_naive", "pipeline sustained / naive_webhook", "x"),
    _f("pipeline.edge_cpu_us", "pipeline: edge agent CPU per row", "µs"),
    _f("pipeline.callback_cpu_us", "pipeline: callback server CPU per row", "µs"),
    _f("pipeline.database_cpu_us", "pipeline: MariaDB CPU per row", "µs"),
    _f("pipeline.load_cpu_us", "pipeline: load generator (wrk) CPU per row", "µs"),
    _f("pipeline.cpu_us", "pipeline: CPU per row, all four", "µs"),
    _f("pipeline.frames_sustained", "pipeline: rows committed, sustained, BATCH_FRAMES=always",
       "rows/s"),
    _f("pipeline.frames_vs_naive", "pipeline sustained / naive_webhook, BATCH_FRAMES=always",
       "x"),
    _f("pipeline.frames_edge_cpu_us", "pipeline, frames: edge agent CPU per row", "µs"),
    _f("pipeline.frames_callback_cpu_us", "pipeline, frames: callback server CPU per row", "µs"),
    _f("pipeline.frames_database_cpu_us", "pipeline, frames: MariaDB CPU per row", "µs"),
    _f("pipeline.frames_load_cpu_us", "pipeline, frames: load generator (wrk) CPU per row", "µs"),
    _f("pipeline.frames_cpu_us", "pipeline, frames: CPU per row, all four", "µs"),
    _f("pipeline.rate", "pipeline latency run: offered rate", "req/s"),
    _f("pipeline.visible_p50_ms", "webhook sent -> row committed, p50", "ms"),
    _f("pipeline.visible_p99_ms", "webhook sent -> row committed, p99", "ms"),
    _f("pipeline.stored_p50_ms", "received_at -> stored_at (DB columns), p50", "ms"),
    _f("pipeline.stored_p99_ms", "received_at -> stored_at (DB columns), p99", "ms"),
    # 3. callback server alone
    _f("consumer.raw_rate", "raw_mqtt: queued messages drained by paho (baseline)", "msg/s"),
    _f("consumer.one_rate", "callback server x1: queued messages committed", "msg/s"),
    _f("consumer.one_cpu_us", "callback server x1 CPU per stored envelope", "µs"),
    _f("consumer.one_db_cpu_us", "callback server x1: the database's CPU per stored envelope",
       "µs"),
    _f("consumer.health_wait_s", "callback server x1: launch -> /callback/health answers",
       "s"),
    _f("consumer.crashes", "callback server exits at start-up, restarted after 2 s", "count"),
    _f("consumer.two_rate", "callback server x2 (shared subscription)", "msg/s"),
    _f("consumer.one_vs_raw", "callback server x1 / raw_mqtt", "x"),
    _f("consumer.two_vs_one", "callback server x2 / x1", "x"),
    # 4. backlog drain
    _f("backlog.seed_rate", "Outbox.put seeding (no HTTP), concurrent puts", "puts/s"),
    _f("backlog.raw_rate", "raw paho QoS 1 publish, no subscriber (baseline)", "msg/s"),
    _f("backlog.verified_rate", "edge backlog drain to a verifying subscriber", "msg/s"),
    _f("backlog.drain_rate", "edge backlog drain, no subscriber, acked", "msg/s"),
    _f("backlog.drain_vs_raw", "edge drain / raw paho publish", "x"),
    _f("backlog.lost", "backlog messages never delivered", "count"),
    _f("backlog.duplicates", "backlog messages delivered twice", "count"),
    _f("backlog.order_violations", "out of order per robot and channel (history apart)",
       "count"),
    _f("backlog.replayed", "history sent after the newest state (replay)", "count"),
    # 5. memory
    _f("memory.idle_mb", "edge RSS idle (connected, empty outbox)", "MiB"),
    _f("memory.empty_down_mb", "edge RSS, empty outbox, broker down", "MiB"),
    _f("memory.full_down_mb", "edge RSS, 1M outbox entries, broker down", "MiB"),
    _f("memory.growth_mb", "RSS growth from 1M outbox entries", "MiB"),
    _f("memory.start_seconds", "edge start-up with 1M entries (to healthy)", "s"),
    _f("memory.robots_before_mb", "edge RSS before a wave of distinct robot ids", "MiB"),
    _f("memory.robots_wave_mb", "edge RSS after a wave of distinct robot ids", "MiB"),
    _f("memory.robots_per_robot_kib", "RSS per robot id of that wave", "KiB"),
    _f("memory.robots_quiet1_mb", "edge RSS once that wave is forgotten (quiet)", "MiB"),
    _f("memory.robots_quiet2_mb", "edge RSS after a 2nd wave of new ids, forgotten", "MiB"),
    # 6. bounded strict parsing on the hot path
    _f("parsing.json_us", "json.loads per sample body (baseline)", "µs"),
    _f("parsing.strict_us", "strictjson.loads per sample body", "µs"),
    _f("parsing.overhead_us", "extra CPU per callback for depth/number checks", "µs"),
    _f("parsing.strict_vs_json", "strictjson.loads / json.loads", "x"),
    # 7. what leaves the site (issue 17): 1,000 callbacks of the mix, 20 robots at 50/s
    _f("forwarding.all_per_1000", "published per 1,000 callbacks, nothing filtered",
       "msgs"),
    _f("forwarding.suggested_per_1000",
       "published per 1,000 callbacks, MIN_INTERVAL_SECONDS=pose=5,power=30,move=5", "msgs"),
    _f("forwarding.downsampled_per_1000", "downsampled away per 1,000 callbacks", "msgs"),
    _f("forwarding.suggested_vs_all", "published with the suggested settings / all", "x"),
    # 8. HTTP ingest while the database is away (issue 24)
    _f("retry.rss_first_mb", "callback server RSS after the first 300 requests", "MiB"),
    _f("retry.rss_after_mb", "callback server RSS after 3,000 requests", "MiB"),
    _f("retry.growth_mb", "RSS growth from the next 2,700 retries", "MiB"),
    _f("retry.held", "messages held (300 distinct)", "count"),
    _f("retry.resent", "POSTs sent again: their connection closed under them", "count"),
    # 10. the cloud's HTTP ingest path (issue 31): POST /callback/messages -> MariaDB
    _f("ingest_http.naive_rate", "naive_ingest: envelopes committed, 1 per POST (baseline)",
       "env/s"),
    _f("ingest_http.naive_cpu_us", "naive_ingest CPU per stored envelope (app only)", "µs"),
    _f("ingest_http.naive_statements", "naive_ingest: database statements per envelope",
       "stmt/env"),
    _f("ingest_http.naive_db_cpu_us", "naive_ingest: the database server's CPU per envelope",
       "µs"),
    _f("ingest_http.naive_load_cpu_us", "naive_ingest: the load generator's CPU per envelope",
       "µs"),
    _f("ingest_http.naive_batch10_rate", "naive_ingest: envelopes committed, 10 per POST",
       "env/s"),
    _f("ingest_http.rate", "callback server: envelopes committed, 1 per POST", "env/s"),
    _f("ingest_http.cpu_us", "callback server CPU per stored envelope, 1 per POST", "µs"),
    _f("ingest_http.statements", "callback server: database statements per envelope",
       "stmt/env"),
    _f("ingest_http.db_cpu_us", "callback server: the database server's CPU per envelope",
       "µs"),
    _f("ingest_http.load_cpu_us", "callback server: the load generator's CPU per envelope",
       "µs"),
    _f("ingest_http.batch10_rate", "callback server: envelopes committed, 10 per POST",
       "env/s"),
    _f("ingest_http.batch10_cpu_us", "callback server CPU per stored envelope, 10 per POST",
       "µs"),
    _f("ingest_http.fixed_rate", "ingest fixed offered rate (1 envelope per POST)", "req/s"),
    _f("ingest_http.p50_ms", "POST -> committed answer, p50 at the fixed rate", "ms"),
    _f("ingest_http.p99_ms", "POST -> committed answer, p99 at the fixed rate", "ms"),
    _f("ingest_http.vs_naive", "callback server / naive_ingest, 1 per POST", "x"),
    _f("ingest_http.batch10_vs_naive", "callback server / naive_ingest, 10 per POST", "x"),
    _f("ingest_http.x2_rate", "two callback servers on one port: envelopes committed, 1 per "
       "POST", "env/s"),
    _f("ingest_http.x2_cpu_us", "two callback servers: CPU per stored envelope (summed)", "µs"),
    _f("ingest_http.x2_statements", "two callback servers: database statements per envelope",
       "stmt/env"),
    _f("ingest_http.x2_db_cpu_us", "two callback servers: the database server's CPU per "
       "envelope", "µs"),
    _f("ingest_http.x2_vs_naive", "two callback servers / naive_ingest (two workers each "
       "side), 1 per POST", "x"),
    # 9. draining to AWS IoT Core's limits (issue 27)
    _f("aws_drain.single_s", "drain time, single", "s"),
    _f("aws_drain.single_vs_limit", "drain time / (publishes / 100 per s), single", "x"),
    _f("aws_drain.single_violations", "over 100 pub/s or 512 KiB/s, single", "count"),
    _f("aws_drain.single_lost", "entries never stored, single", "count"),
    _f("aws_drain.single_out_of_order", "merged out of order, single", "count"),
    _f("aws_drain.single_newest_state_s", "newest state of every robot stored, single", "s"),
    _f("aws_drain.single_units_per_envelope", "billed 5 KiB units per envelope, single", "x"),
    _f("aws_drain.single_publishes", "publishes, single", "count"),
    _f("aws_drain.single_fresh_posted", "fresh changes posted, single", "count"),
    _f("aws_drain.single_fresh_unstored", "fresh changes never stored, single", "count"),
    _f("aws_drain.single_fresh_median_s", "fresh change stored after, median, single", "s"),
    _f("aws_drain.single_fresh_max_s", "fresh change stored after, max, single", "s"),
    _f("aws_drain.frames_s", "drain time, batch frames", "s"),
    _f("aws_drain.frames_vs_limit", "drain time / (entries / 100 per s), batch frames", "x"),
    _f("aws_drain.frames_violations", "over 100 pub/s or 512 KiB/s, batch frames", "count"),
    _f("aws_drain.frames_lost", "entries never stored, batch frames", "count"),
    _f("aws_drain.frames_out_of_order", "merged out of order, batch frames", "count"),
    _f("aws_drain.frames_newest_state_s", "newest state of every robot stored, batch frames", "s"),
    _f("aws_drain.frames_units_per_envelope", "billed 5 KiB units per envelope, batch frames", "x"),
    _f("aws_drain.frames_publishes", "publishes, batch frames", "count"),
    _f("aws_drain.frames_fresh_posted", "fresh changes posted, batch frames", "count"),
    _f("aws_drain.frames_fresh_unstored", "fresh changes never stored, batch frames", "count"),
    _f("aws_drain.frames_fresh_median_s", "fresh change stored after, median, batch frames", "s"),
    _f("aws_drain.frames_fresh_max_s", "fresh change stored after, max, batch frames", "s"),
    _f("aws_drain.frames_speedup", "drain time without / with batch frames", "x"),
)
FIGURE_BY_KEY = {f.key: f for f in FIGURES}

TARGETS: tuple[Target, ...] = (
    Target("1a", "edge durable accepts >= 1.5x FastAPI echo", "ingest.edge_vs_fastapi",
           ">=", 1.5),
    Target("1b", "edge durable accepts >= 0.6x Starlette echo", "ingest.edge_vs_starlette",
           ">=", 0.6),
    Target("1c", "edge p99 accept latency at fixed rate <= 20 ms", "ingest.edge_p99_ms",
           "<=", 20.0),
    Target("2a", "pipeline sustained >= 5x naive_webhook", "pipeline.vs_naive", ">=", 5.0),
    Target("2b", "webhook -> row p50 at 500/s <= 10 ms", "pipeline.visible_p50_ms", "<=", 10.0),
    Target("2c", "webhook -> row p99 at 500/s <= 50 ms", "pipeline.visible_p99_ms", "<=", 50.0),
    Target("3a", "callback server >= 0.7x raw_mqtt", "consumer.one_vs_raw", ">=", 0.7),
    Target("3b", "2 replicas (shared sub) >= 1.6x one", "consumer.two_vs_one", ">=", 1.6),
    Target("4a", "backlog drain >= 0.5x raw paho QoS 1 publish", "backlog.drain_vs_raw",
           ">=", 0.5),
    Target("4b", "backlog: none lost", "backlog.lost", "<=", 0.0),
    Target("4c", "backlog: in order per robot and channel", "backlog.order_violations",
           "<=", 0.0),
    Target("5a", "edge idle RSS <= 60 MB", "memory.idle_mb", "<=", 60.0),
    Target("5b", "RSS growth with 1M outbox entries <= 20 MB", "memory.growth_mb", "<=", 20.0),
    # 3 µs is 1% of a durable accept's ~310 µs of CPU.
    Target("6a", "strict parsing adds <= 3 µs CPU per callback", "parsing.overhead_us",
           "<=", 3.0),
    Target("8a", "RSS growth from 2,700 more ingest retries <= 10 MiB", "retry.growth_mb",
           "<=", 10.0),
    Target("10a", "HTTP ingest >= 5x naive per-request upsert", "ingest_http.vs_naive",
           ">=", 5.0),
    Target("10b", "HTTP ingest p99 at 500/s <= 50 ms", "ingest_http.p99_ms", "<=", 50.0),
    Target("9a", "AWS drain: no publish over the limits", "aws_drain.single_violations",
           "<=", 0.0),
    Target("9b", "AWS drain: every robot's newest state stored within 5 s",
           "aws_drain.single_newest_state_s", "<=", 5.0),
    Target("9c", "AWS drain: batch frames >= 5x faster", "aws_drain.frames_speedup",
           ">=", 5.0),
    Target("9d", "AWS drain: fresh callbacks stored within 2 s", "aws_drain.single_fresh_max_s",
           "<=", 2.0),
)


def summarise(values: list[float]) -> Summary:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        nan = float("nan")
        return Summary(nan, nan, nan, tuple(values))
    return Summary(statistics.median(clean), min(clean), max(clean), tuple(values))


def met(target: Target, summary: Summary) -> bool | None:
    """Judged on the median; None when the figure was not measured."""
    if math.isnan(summary.median):
        return None
    if target.op == ">=":
        return summary.median >= target.threshold
    return summary.median <= target.threshold
