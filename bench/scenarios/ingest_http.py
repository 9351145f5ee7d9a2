"""Target 10 (issue 31): the callback server's ``POST /callback/messages`` (the IoT Rule
HTTP ingest path) on MariaDB, against a naive Flask + PyMySQL per-request upsert.

The bodies are the edge's own envelopes for the sample mix (``bench.samples.envelopes``),
built before the load so the generator spends nothing on them; every id is sent once.
Both servers are saturated by the same generator, 64 connections, one envelope per POST:
wrk reading the bodies from a file (``bench.wrk.run_wrk_bodies``), else the Python
``closed_loop`` (``--loadgen python``), whose own CPU is spent on the same two cores;
then AWS-batched POSTs of 10 (a JSON array) are reported beside it. Throughput counts
envelopes committed (the server's ``callback_messages_stored_total``; the baseline's
rows), CPU is the server process's (with its children) user + system time divided by
those envelopes. Latency: open loop at ``pipeline_rate`` single-envelope POSTs per
second; the answer comes after the commit.

The baseline runs two gunicorn workers, one per core; so the server is measured again as
two replicas sharing the port (``CALLBACK_HTTP_REUSE_PORT``, one ``SHARE_GROUP``), their
envelopes counted in the message log and their CPU summed (``x2_*``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import apps, db
from bench.baselines.naive_ingest import TABLE, TABLE_DDL
from bench.loadgen import closed_loop, open_loop
from bench.procs import Broker, Service, cpu_seconds, free_port
from bench.samples import envelopes
from bench.scenarios.common import load_cpu, metric, run_async
from bench.scenarios.profiling import Profiler
from bench.settings import RunContext
from bench.wrk import run_wrk_bodies, wrk_path

log = logging.getLogger(__name__)

PATH = "/callback/messages"
TOKEN = apps.CALLBACK_TOKEN
HEADERS = f"X-Callback-Token: {TOKEN}\r\n"
BATCH = 10


class EnvelopeBodies:
    """``body(n)``: the n-th POST, ``batch`` envelopes (an array when more than one)."""

    def __init__(self, payloads: list[bytes], batch: int, tag: str) -> None:
        self.payloads = payloads
        self.batch = batch
        self.tag = tag

    def __len__(self) -> int:
        return len(self.payloads) // self.batch

    def body(self, n: int) -> bytes:
        if self.batch == 1:
            return self.payloads[n]
        return b"[" + b",".join(self.payloads[n * self.batch:(n + 1) * self.batch]) + b"]"

    def trace_id(self, n: int) -> str:
        return f"bench-{self.tag}-{n}"


def _stored(svc: Service) -> float:
    return metric(svc, "callback_messages_stored_total")


def _bodies(count: int, batch: int, robots: int) -> EnvelopeBodies:
    tag = format(time.time_ns() % 36**8, "x")
    payloads = [p for _, p, _ in envelopes(count * batch, org="bench", robots=robots,
                                           tag=tag)]
    return EnvelopeBodies(payloads, batch, tag)


@dataclass(frozen=True, slots=True)
class Run:
    stored: float
    elapsed: float
    cpu_us: float  # per stored envelope
    db_cpu_us: float  # the database server's, per stored envelope
    statements: float  # statements the database ran, per stored envelope
    load_cpu_us: float = float("nan")  # the load generator's, per stored envelope

    @property
    def rate(self) -> float:
        return self.stored / self.elapsed if self.elapsed else 0.0


def _saturate(ctx: RunContext, svc: Service | Sequence[Service], bodies: EnvelopeBodies,
              stored: Callable[[], float], db_pid: int | None) -> Run:
    """Saturate ``svc`` (or replicas sharing one port); their CPU summed, and the
    database server's (``db_pid``) beside it."""
    s = ctx.settings
    svcs = [svc] if isinstance(svc, Service) else list(svc)

    def cpu() -> float:
        return sum(cpu_seconds(one.pid) for one in svcs)

    before, cpu0, db0 = stored(), cpu(), db.server_cpu(db_pid)
    q0 = db.statements(ctx.settings.database_url)
    load0 = load_cpu()
    if s.loadgen == "wrk" and wrk_path() is not None:
        w = run_wrk_bodies(svcs[0].port, [bodies.body(i) for i in range(len(bodies))],
                           ctx.dir("wrk") / f"ingest-http-{bodies.tag}.lua",
                           duration=s.duration, connections=s.connections, path=PATH,
                           headers={"X-Callback-Token": TOKEN})
        ok, failed, errors, elapsed = w.ok, w.requests - w.ok, w.errors, w.elapsed
    else:
        res = run_async(closed_loop("127.0.0.1", svcs[0].port, bodies,
                                    duration=s.duration, connections=s.connections,
                                    path=PATH, requests=len(bodies), headers=HEADERS))
        ok, failed, errors, elapsed = res.ok, res.failed, res.errors, res.elapsed
    used, db_used, load_used = cpu() - cpu0, db.server_cpu(db_pid) - db0, load_cpu() - load0
    n = stored() - before
    ran = db.statements(ctx.settings.database_url) - q0
    if failed or errors or n < ok * bodies.batch:
        raise RuntimeError(f"{svcs[0].name}: {ok} answered 2xx, {failed} not, "
                           f"{errors} errors, {n:.0f} envelopes stored")
    if not n:
        return Run(n, elapsed, float("nan"), float("nan"), float("nan"))
    return Run(n, elapsed, used / n * 1e6, db_used / n * 1e6, ran / n, load_used / n * 1e6)


def _replicas(ctx: RunContext, d: Path, broker: Broker, url: str, n: int) -> list[Service]:
    """``n`` callback servers on one port, started; each has logged its own bind (the
    shared port's health answers for whichever is up first)."""
    port, group = free_port(), f"bench-ingest-{ctx.run}-{time.time_ns()}"
    svcs = [apps.callback_server(d, f"callback-ingest-r{i}", broker.url, url, port=port,
                                 client_id=f"{group}-{i}", share_group=group,
                                 CALLBACK_HTTP_REUSE_PORT="true").launch() for i in range(n)]
    deadline = time.monotonic() + 60
    for svc in svcs:
        svc.wait_ready()
        while "listening on" not in svc.log_tail(100_000):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{svc.name} not listening: {svc.log_tail()}")
            time.sleep(0.05)  # the log line is the only sign of this replica's bind
    return svcs


def run(ctx: RunContext) -> dict[str, float]:
    s = ctx.settings
    d = ctx.dir("ingest_http")
    url = s.database_url
    # Enough bodies that no id is sent twice within a saturation run (wrk, sending until
    # its time is up, needs them for the fastest rate seen: 4,000 envelopes/s, and half
    # as many again).
    need = max(2_000, int(s.duration * 6_000))
    single, batched = _bodies(need, 1, s.robots), _bodies(need // 4, BATCH, s.robots)
    out: dict[str, float] = {}
    db_pid = db.server_pid(url)

    db.reset(url)
    db.execute(url, TABLE_DDL)
    with apps.naive_webhook(d, url, "naive_ingest") as svc:
        def rows() -> float:
            return float(db.count(url, TABLE))
        naive = _saturate(ctx, svc, single, rows, db_pid)
        naive10 = _saturate(ctx, svc, batched, rows, db_pid)
    out["ingest_http.naive_rate"] = naive.rate
    out["ingest_http.naive_cpu_us"] = naive.cpu_us
    out["ingest_http.naive_db_cpu_us"] = naive.db_cpu_us
    out["ingest_http.naive_statements"] = naive.statements
    out["ingest_http.naive_load_cpu_us"] = naive.load_cpu_us
    out["ingest_http.naive_batch10_rate"] = naive10.rate
    log.info("naive_ingest: %.0f envelopes/s (%.0f µs CPU each, the database %.0f); batches "
             "of 10: %.0f/s", naive.rate, naive.cpu_us, naive.db_cpu_us, naive10.rate)

    db.reset(url)
    with Broker(d / "broker") as broker:
        svc = apps.callback_server(d, "callback-ingest", broker.url, url,
                                   client_id=f"bench-ingest-{ctx.run}-{time.time_ns()}")
        svc.start()
        try:
            one = _saturate(ctx, svc, single, lambda: _stored(svc), db_pid)
            ten = _saturate(ctx, svc, batched, lambda: _stored(svc), db_pid)
            fixed = _bodies(int(s.pipeline_rate * s.rate_duration), 1, s.robots)
            res = run_async(open_loop("127.0.0.1", svc.port, fixed,
                                      rate=s.pipeline_rate, duration=s.rate_duration,
                                      connections=s.connections, path=PATH,
                                      headers=HEADERS))
            if s.profile and ctx.run == 0:  # an extra pass, not reported: py-spy slows it
                prof = Profiler(ctx, svc.pid, "callback-ingest-http", s.duration)
                _saturate(ctx, svc, _bodies(need, 1, s.robots), lambda: _stored(svc), db_pid)
                prof.finish()
        finally:
            svc.stop()
        db.reset(url)
        svcs = _replicas(ctx, d, broker, url, 2)
        try:
            two = _saturate(ctx, svcs, single, lambda: float(db.count(url, db.LOG_TABLE)),
                            db_pid)
        finally:
            for svc in svcs:
                svc.stop()
    if res.failed or res.errors:
        raise RuntimeError(f"fixed rate: {res.failed} non-2xx, {res.errors} errors")
    out["ingest_http.rate"] = one.rate
    out["ingest_http.cpu_us"] = one.cpu_us
    out["ingest_http.db_cpu_us"] = one.db_cpu_us
    out["ingest_http.statements"] = one.statements
    out["ingest_http.load_cpu_us"] = one.load_cpu_us
    out["ingest_http.batch10_rate"] = ten.rate
    out["ingest_http.batch10_cpu_us"] = ten.cpu_us
    out["ingest_http.fixed_rate"] = res.ok_per_second
    out["ingest_http.p50_ms"] = res.percentile(50) * 1000
    out["ingest_http.p99_ms"] = res.percentile(99) * 1000
    out["ingest_http.vs_naive"] = one.rate / naive.rate
    out["ingest_http.x2_rate"] = two.rate
    out["ingest_http.x2_cpu_us"] = two.cpu_us
    out["ingest_http.x2_db_cpu_us"] = two.db_cpu_us
    out["ingest_http.x2_statements"] = two.statements
    out["ingest_http.x2_vs_naive"] = two.rate / naive.rate
    out["ingest_http.batch10_vs_naive"] = ten.rate / naive10.rate
    log.info("ingest_http: %.0f envelopes/s (%.0f µs CPU each, the database %.0f, %.2fx naive);"
             " batches of 10: %.0f/s (%.0f µs); p99 %.1f ms at %.0f/s", one.rate, one.cpu_us,
             one.db_cpu_us,
             out["ingest_http.vs_naive"], ten.rate, ten.cpu_us, out["ingest_http.p99_ms"],
             out["ingest_http.fixed_rate"])
    log.info("ingest_http, two replicas on one port: %.0f envelopes/s (%.0f µs CPU each, "
             "%.2fx naive's two workers)", two.rate, two.cpu_us, out["ingest_http.x2_vs_naive"])
    return out
