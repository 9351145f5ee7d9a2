"""What several scenarios share: saturating a server, reading /metrics, waiting."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.loadgen import closed_loop
from bench.procs import Service, cpu_seconds, http_get, proc_status
from bench.samples import BodyFactory
from bench.settings import RunContext
from bench.wrk import run_wrk, wrk_path

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run with uvloop when it is there: the generator should cost as little as it can."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@dataclass(frozen=True, slots=True)
class Saturation:
    """A closed-loop run at maximum throughput."""

    ok: int
    elapsed: float
    p50: float
    p99: float
    cpu_us: float  # the server's CPU (with its children) per 2xx answer

    @property
    def ok_per_second(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


def load_cpu() -> float:
    """CPU seconds of the load generator so far: this process (the Python client) and
    its waited-for children (wrk)."""
    me, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def saturate(ctx: RunContext, svc: Service, factory: BodyFactory) -> Saturation:
    """``connections`` connections back to back for ``duration`` seconds (wrk if present)."""
    s = ctx.settings
    cpu0 = cpu_seconds(svc.pid)
    if s.loadgen == "wrk" and wrk_path() is not None:
        w = run_wrk(svc.port, factory, ctx.dir("wrk"), duration=s.duration,
                    connections=s.connections)
        ok, elapsed, p50, p99 = w.ok, w.elapsed, w.p50, w.p99
    else:
        r = run_async(closed_loop("127.0.0.1", svc.port, factory, duration=s.duration,
                                  connections=s.connections))
        ok, elapsed, p50, p99 = r.ok, r.elapsed, r.percentile(50), r.percentile(99)
    cpu = cpu_seconds(svc.pid) - cpu0
    return Saturation(ok, elapsed, p50, p99, cpu / ok * 1e6 if ok else float("nan"))


def metric(svc: Service, name: str) -> float:
    """One sample of the service's Prometheus /metrics (0 when absent)."""
    text = http_get(svc.metrics_url, svc.token).decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line[len(name) + 1:])
    return 0.0


def labelled(svc: Service, name: str, label: str) -> float:
    """The sum of ``name{...}`` over every series carrying ``label``, e.g.
    ``edge_webhooks_total{outcome="accepted"}`` over all callback types."""
    text = http_get(svc.metrics_url, svc.token).decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and "} " in line:
            labels, _, value = line[len(name) + 1:].partition("} ")
            if label in labels.split(","):
                total += float(value)
    return total


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.05,
               what: str = "condition") -> float:
    """Poll ``check`` until true; returns the time.time() it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def edge_health(svc: Service) -> dict[str, Any]:
    return json.loads(http_get(svc.url + "/api/pudu/webhook/health"))  # type: ignore[no-any-return]


def wait_edge_drained(svc: Service, timeout: float = 120.0) -> None:
    """Until the edge's outbox is empty and nothing is in flight."""
    def drained() -> bool:
        h = edge_health(svc)
        return h["outbox_depth"] == 0 and h["inflight"] == 0

    wait_until(drained, timeout=timeout, interval=0.1, what="edge outbox drained")


def rss_mib(pid: int) -> float:
    return proc_status(pid)["VmRSS"] / 1024
