"""Target 1: the edge agent's webhook against echo baselines, one worker, 64 connections.

Every server gets the same load: the sample mix with unique sn/timestamps, posted by wrk
(or the Python generator) on 64 keep-alive connections for ``duration`` seconds. The
edge runs as deployed, its broker a private Mosquitto, so the publisher drains the
outbox while the webhook accepts. Its latency is then measured open-loop at a fixed
rate (``latency_load`` x its measured maximum), not at saturation (docs/measured.md: p99 at
saturation swings 17-94 ms between runs).
"""

from __future__ import annotations

import logging
from pathlib import Path

from bench import apps
from bench.loadgen import open_loop
from bench.mqtt import settled_counter
from bench.procs import Broker
from bench.samples import BodyFactory
from bench.scenarios.common import (
    labelled,
    metric,
    rss_mib,
    run_async,
    saturate,
    wait_edge_drained,
)
from bench.scenarios.profiling import profile_edge
from bench.settings import RunContext

log = logging.getLogger(__name__)


def run(ctx: RunContext) -> dict[str, float]:
    s = ctx.settings
    d = ctx.dir("ingest")
    out: dict[str, float] = {}
    with Broker(d / "broker") as broker:
        for kind in ("starlette", "fastapi"):
            with apps.echo(d, kind) as svc:
                sat = saturate(ctx, svc, BodyFactory(robots=s.robots))
            out[f"ingest.{kind}_rps"] = sat.ok_per_second
            out[f"ingest.{kind}_cpu_us"] = sat.cpu_us
            log.info("%s echo: %.0f req/s", kind, sat.ok_per_second)

        before = settled_counter(broker.port)
        with apps.naive_forward(d, broker.port) as svc:
            sat = saturate(ctx, svc, BodyFactory(robots=s.robots))
            # what paho still holds is sent after the load stops; count it too
            delivered = settled_counter(broker.port, timeout=60) - before
        out["ingest.naive_forward_rps"] = sat.ok_per_second
        out["ingest.naive_forward_delivered_pct"] = 100 * delivered / sat.ok if sat.ok else 0
        log.info("naive_forward: %.0f req/s, %.0f%% reached the broker",
                 sat.ok_per_second, out["ingest.naive_forward_delivered_pct"])

        edge = apps.edge_agent(d, "edge", broker.url, d / "outbox.db").start()
        try:
            def accepted() -> float:
                return labelled(edge, "edge_webhooks_total", 'outcome="accepted"')

            acc0 = accepted()
            dup0 = labelled(edge, "edge_webhooks_total", 'outcome="duplicate"')
            sat = saturate(ctx, edge, BodyFactory(robots=s.robots))
            accepts = accepted() - acc0
            out["ingest.edge_accepts"] = accepts / sat.elapsed
            out["ingest.edge_cpu_us"] = sat.cpu_us
            out["ingest.edge_p99_saturated_ms"] = sat.p99 * 1000
            out["ingest.edge_duplicates"] = (
                labelled(edge, "edge_webhooks_total", 'outcome="duplicate"') - dup0)
            log.info("edge: %.0f durable accepts/s, p99 %.1f ms at saturation",
                     out["ingest.edge_accepts"], sat.p99 * 1000)

            wait_edge_drained(edge)
            rate = max(10.0, s.latency_load * out["ingest.edge_accepts"])
            res = run_async(open_loop("127.0.0.1", edge.port, BodyFactory(robots=s.robots),
                                      rate=rate, duration=s.rate_duration,
                                      connections=s.connections))
            out["ingest.edge_fixed_rate"] = res.ok / res.elapsed if res.elapsed else 0.0
            out["ingest.edge_p50_ms"] = res.percentile(50) * 1000
            out["ingest.edge_p99_ms"] = res.percentile(99) * 1000
            out["ingest.edge_rss_after_mb"] = rss_mib(edge.pid)
            log.info("edge at %.0f req/s: p50 %.1f ms, p99 %.1f ms", rate,
                     out["ingest.edge_p50_ms"], out["ingest.edge_p99_ms"])
            # Control: the same generator and rate against the FastAPI echo, so the
            # generator's own jitter on these two cores is visible beside the edge's p99.
            with apps.echo(d, "fastapi") as echo:
                ctl = run_async(open_loop("127.0.0.1", echo.port, BodyFactory(robots=s.robots),
                                          rate=rate, duration=s.rate_duration,
                                          connections=s.connections))
            out["ingest.fastapi_p99_ms"] = ctl.percentile(99) * 1000
            if s.profile and ctx.run == 0:
                profile_edge(ctx, edge)  # an extra pass after the measured ones
        finally:
            edge.stop()
        out |= _framed_edge(ctx, d, broker)
    out["ingest.edge_vs_fastapi"] = out["ingest.edge_accepts"] / out["ingest.fastapi_rps"]
    out["ingest.edge_vs_starlette"] = out["ingest.edge_accepts"] / out["ingest.starlette_rps"]
    out["ingest.edge_vs_naive_forward"] = (
        out["ingest.edge_accepts"] / out["ingest.naive_forward_rps"])
    out["ingest.frames_vs_fastapi"] = out["ingest.frames_accepts"] / out["ingest.fastapi_rps"]
    out["ingest.frames_vs_starlette"] = (
        out["ingest.frames_accepts"] / out["ingest.starlette_rps"])
    return out


def _framed_edge(ctx: RunContext, d: Path, broker: Broker) -> dict[str, float]:
    """The same saturation with ``BATCH_FRAMES=always``: live bursts packed into batch
    frames, so the edge's MQTT client sends a publish per burst, not per callback."""
    edge = apps.edge_agent(d, "edge-frames", broker.url, d / "outbox-frames.db",
                           BATCH_FRAMES="always").start()
    try:
        acc0 = labelled(edge, "edge_webhooks_total", 'outcome="accepted"')
        pub0 = metric(edge, "edge_published_total")
        sat = saturate(ctx, edge, BodyFactory(robots=ctx.settings.robots))
        accepts = labelled(edge, "edge_webhooks_total", 'outcome="accepted"') - acc0
        wait_edge_drained(edge)  # every accepted callback reached the broker
        publishes = metric(edge, "edge_published_total") - pub0
        if ctx.settings.profile and ctx.run == 0:
            profile_edge(ctx, edge, "edge-ingest-frames")
    finally:
        edge.stop()
    per_100 = 100 * publishes / accepts if accepts else 0.0
    log.info("edge, BATCH_FRAMES=always: %.0f durable accepts/s, %.1f publishes a 100",
             accepts / sat.elapsed, per_100)
    return {"ingest.frames_accepts": accepts / sat.elapsed,
            "ingest.frames_cpu_us": sat.cpu_us,
            "ingest.frames_publishes_per_100": per_100}
