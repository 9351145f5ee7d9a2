"""Target 2: webhook -> edge -> Mosquitto -> callback server -> MariaDB, against the
seed design (Flask + PyMySQL, one upsert and commit per callback).

Sustained rate: the edge is saturated for ``duration`` seconds; the figure is the
callbacks it accepted divided by the time from the start of the load until the last of
them is committed in ``mqtt_message_log`` (a backlog left in the outbox counts against
it). Latency: ``pipeline_rate`` callbacks/s offered open-loop; the message id from each
200 answer is polled for in the log every 2 ms, so the figure runs from the moment the
webhook was sent to the moment its row is visible to another connection. The
``received_at``/``stored_at`` columns give a second, server-side view (it leaves out the
HTTP exchange and the COMMIT itself: ``stored_at`` is taken when the batch is built).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from bench import apps, db
from bench.baselines.naive_webhook import TABLE, TABLE_DDL
from bench.loadgen import LoadResult, open_loop
from bench.procs import Broker, Service, cpu_seconds
from bench.samples import BodyFactory
from bench.scenarios.common import (
    labelled,
    load_cpu,
    metric,
    run_async,
    saturate,
    wait_edge_drained,
    wait_until,
)
from bench.scenarios.profiling import Profiler
from bench.settings import RunContext

log = logging.getLogger(__name__)


async def _latency_run(ctx: RunContext, port: int) -> tuple[LoadResult, db.VisibilityPoller]:
    s = ctx.settings
    poller = db.VisibilityPoller(s.database_url)
    task = asyncio.create_task(poller.run(), name="visibility-poller")

    def on_response(n: int, sent: float, body: bytes) -> None:
        poller.add(json.loads(body)["data"]["message_id"], sent)

    res = await open_loop("127.0.0.1", port, BodyFactory(robots=s.robots),
                          rate=s.pipeline_rate, duration=s.rate_duration,
                          connections=s.connections, on_response=on_response)
    poller.stop()
    await asyncio.wait_for(task, 60)
    return res, poller


def run(ctx: RunContext) -> dict[str, float]:
    s = ctx.settings
    d = ctx.dir("pipeline")
    url = s.database_url
    out: dict[str, float] = {}

    db.reset(url)
    db.execute(url, TABLE_DDL)
    with apps.naive_webhook(d, url) as svc:
        sat = saturate(ctx, svc, BodyFactory(robots=s.robots))
    committed = _naive_callbacks(url)
    if committed < sat.ok:
        raise RuntimeError(f"naive_webhook answered {sat.ok} but committed {committed}")
    out["pipeline.naive_webhook_rps"] = sat.ok_per_second
    out["pipeline.naive_webhook_cpu_us"] = sat.cpu_us
    log.info("naive_webhook: %.0f rows/s", sat.ok_per_second)

    db.reset(url)
    with Broker(d / "broker") as broker:
        cs = apps.callback_server(d, "callback", broker.url, url,
                                  client_id=f"bench-pipeline-{ctx.run}-{time.time_ns()}")
        edge = apps.edge_agent(d, "edge", broker.url, d / "outbox.db")
        try:
            cs.start()
            edge.start()
            plain = _sustained(ctx, edge, cs)
            out["pipeline.accepts"], out["pipeline.sustained"] = plain.accepts, plain.rows
            out["pipeline.drain_lag_s"] = plain.lag
            out |= plain.figures("pipeline.")

            wait_edge_drained(edge)
            db.reset(url)
            res, poller = run_async(_latency_run(ctx, edge.port))
            out["pipeline.rate"] = res.ok / res.elapsed if res.elapsed else 0.0
            out["pipeline.visible_p50_ms"] = db.percentile(poller.latencies, 50) * 1000
            out["pipeline.visible_p99_ms"] = db.percentile(poller.latencies, 99) * 1000
            server_side = db.stored_minus_received(url)
            out["pipeline.stored_p50_ms"] = db.percentile(server_side, 50) * 1000
            out["pipeline.stored_p99_ms"] = db.percentile(server_side, 99) * 1000
            log.info("pipeline at %.0f/s: sent->row p50 %.1f ms p99 %.1f ms (%d polls)",
                     out["pipeline.rate"], out["pipeline.visible_p50_ms"],
                     out["pipeline.visible_p99_ms"], poller.polls)
        finally:
            edge.stop()
            cs.stop()
        db.reset(url)
        cs = apps.callback_server(d, "callback-frames", broker.url, url,
                                  client_id=f"bench-frames-{ctx.run}-{time.time_ns()}")
        edge = apps.edge_agent(d, "edge-frames", broker.url, d / "outbox-frames.db",
                               BATCH_FRAMES="always")
        try:
            cs.start()
            edge.start()
            framed = _sustained(ctx, edge, cs, "BATCH_FRAMES=always")
            out["pipeline.frames_sustained"] = framed.rows
            out |= framed.figures("pipeline.frames_")
            if s.profile and ctx.run == 0:  # an extra pass, not reported: py-spy slows both
                profilers = [Profiler(ctx, svc.pid, name, s.duration) for svc, name in
                             ((cs, "callback-pipeline-frames"), (edge, "edge-pipeline-frames"))]
                saturate(ctx, edge, BodyFactory(robots=s.robots))
                for profiler in profilers:
                    profiler.finish()
        finally:
            edge.stop()
            cs.stop()
    out["pipeline.vs_naive"] = out["pipeline.sustained"] / out["pipeline.naive_webhook_rps"]
    out["pipeline.frames_vs_naive"] = (
        out["pipeline.frames_sustained"] / out["pipeline.naive_webhook_rps"])
    return out


@dataclass(frozen=True, slots=True)
class Sustained:
    accepts: float  # a second, while the edge was saturated
    rows: float  # committed a second, until the last accepted callback was
    lag: float  # seconds from the end of the load to that last commit
    #: CPU µs per committed row of each process on the path: edge, callback (server),
    #: database (server; NaN when it is not on this machine), load (generator)
    cpu_us: dict[str, float]

    def figures(self, prefix: str) -> dict[str, float]:
        """The CPU figures, and their sum: on a machine the whole pipeline shares, what
        one row costs decides the rate (two cores: 2e6 / the sum, rows a second)."""
        out = {f"{prefix}{name}_cpu_us": us for name, us in self.cpu_us.items()}
        out[f"{prefix}cpu_us"] = sum(self.cpu_us.values())
        return out


def _sustained(ctx: RunContext, edge: Service, cs: Service, how: str = "") -> Sustained:
    """The pipeline with the edge saturated: the rows are counted until the last accepted
    callback is committed."""
    url = ctx.settings.database_url
    db_pid = db.server_pid(url)

    def cpu() -> dict[str, float]:
        return {"edge": cpu_seconds(edge.pid), "callback": cpu_seconds(cs.pid),
                "database": db.server_cpu(db_pid)}

    acc0 = labelled(edge, "edge_webhooks_total", 'outcome="accepted"')
    stored0 = metric(cs, "callback_messages_stored_total")
    cpu0, load0 = cpu(), load_cpu()
    start = time.time()
    sat = saturate(ctx, edge, BodyFactory(robots=ctx.settings.robots))
    load_end, load = time.time(), load_cpu() - load0  # before this process polls
    accepted = labelled(edge, "edge_webhooks_total", 'outcome="accepted"') - acc0
    done = wait_until(
        lambda: metric(cs, "callback_messages_stored_total") - stored0 >= accepted,
        timeout=300, interval=0.05, what="pipeline rows committed")
    used = {name: seconds - cpu0[name] for name, seconds in cpu().items()}
    rows = db.count(url, db.LOG_TABLE)
    if rows < accepted:
        raise RuntimeError(f"edge accepted {accepted:.0f}, log holds {rows}")
    run = Sustained(accepted / sat.elapsed, accepted / (done - start), max(0.0, done - load_end),
                    {name: seconds / accepted * 1e6
                     for name, seconds in (*used.items(), ("load", load))})
    log.info("pipeline%s: %.0f accepts/s, %.0f rows/s sustained (lag %.1f s); CPU µs a row: %s",
             f", {how}" if how else "", run.accepts, run.rows, run.lag,
             ", ".join(f"{name} {us:.0f}" for name, us in run.cpu_us.items()))
    return run


def _naive_callbacks(url: str) -> int:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT COALESCE(SUM(callbacks), 0) FROM {TABLE}")
        return int(cur.fetchone()[0])
