"""Target 5: the edge agent's resident memory idle, and with a million entries queued.

The million-entry outbox is written directly with sqlite3 using the outbox's own schema
(``bridge.outbox._SCHEMA``), cycling through 10,000 real envelopes: putting a million
through ``Outbox.put`` would take minutes and measure nothing more. It is written once
per bench and reused by every repetition (the agent does not change it while the broker
is down). RSS is VmRSS from /proc/<pid>/status two seconds after the agent is healthy;
the growth compares it with the same agent, broker down, on an empty outbox.

Per-robot state (issue 24): an agent with a short ``ROBOT_QUIET_SECONDS`` takes two waves
of ``memory_robots`` distinct robot ids each (the sample mix), and its RSS is read before,
after the first wave, once it has forgotten them (health's ``robot_states`` all 0), and
after a second wave of new ids forgotten too: memory that is bounded comes back to the
same level instead of growing by a wave each time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import time
from pathlib import Path

from bench import apps
from bench.loadgen import closed_loop
from bench.procs import Broker, Service, free_port
from bench.samples import BodyFactory, envelopes
from bench.scenarios.common import edge_health, rss_mib
from bench.settings import RunContext
from bridge.outbox import SCHEMA as _SCHEMA

log = logging.getLogger(__name__)

SETTLE_SECONDS = 2.0


def seed_direct(path: Path, count: int) -> float:
    """``count`` rows straight into a fresh outbox file; returns seconds taken."""
    start = time.perf_counter()
    path.unlink(missing_ok=True)
    sample = list(envelopes(min(count, 10_000), org="bench", tag="mem"))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(_SCHEMA)
        now = time.time()
        rows = ((topic, payload, 1, 0, key, now)
                for topic, payload, key in itertools.islice(itertools.cycle(sample), count))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO outbox (topic, payload, qos, retain, compact_key, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - start


def _settled_rss(svc_pid: int) -> float:
    time.sleep(SETTLE_SECONDS)  # let start-up garbage be collected and threads settle
    return rss_mib(svc_pid)


#: ROBOT_QUIET_SECONDS of the per-robot run: long enough for a wave to be sent.
ROBOT_QUIET_SECONDS = 20.0


def _forgotten(edge: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(edge_health(edge)["robot_states"].values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"robots not forgotten: {edge_health(edge)['robot_states']}")
        time.sleep(0.5)


def robot_waves(ctx: RunContext, d: Path) -> dict[str, float]:
    """RSS before, after a wave of distinct robot ids, and once they are forgotten."""
    n = ctx.settings.memory_robots
    out: dict[str, float] = {}
    with Broker(d / "broker-robots") as broker:
        edge = apps.edge_agent(d, "edge-robots", broker.url, d / "robots.db",
                               ROBOT_QUIET_SECONDS=str(ROBOT_QUIET_SECONDS)).start()
        try:
            out["memory.robots_before_mb"] = _settled_rss(edge.pid)
            for wave in (1, 2):
                factory = BodyFactory(robots=n, tag=f"w{wave}r{ctx.run}")
                sent = asyncio.run(closed_loop("127.0.0.1", edge.port, factory,
                                               duration=600, requests=n, connections=32))
                if sent.ok < n:
                    raise RuntimeError(f"wave {wave}: {sent.ok} of {n} answered 2xx")
                if wave == 1:
                    states = edge_health(edge)["robot_states"]["robots"]
                    out["memory.robots_wave_mb"] = rss_mib(edge.pid)
                    out["memory.robots_per_robot_kib"] = (
                        (out["memory.robots_wave_mb"] - out["memory.robots_before_mb"])
                        * 1024 / max(1, states))
                _forgotten(edge, ROBOT_QUIET_SECONDS * 3 + 60)
                out[f"memory.robots_quiet{wave}_mb"] = _settled_rss(edge.pid)
        finally:
            edge.stop()
    log.info("edge RSS with %d robot ids a wave: before %.1f MiB, after wave 1 %.1f MiB, "
             "forgotten %.1f MiB, after wave 2 forgotten %.1f MiB", n,
             out["memory.robots_before_mb"], out["memory.robots_wave_mb"],
             out["memory.robots_quiet1_mb"], out["memory.robots_quiet2_mb"])
    return out


def run(ctx: RunContext) -> dict[str, float]:
    s = ctx.settings
    d = ctx.dir("memory")
    out: dict[str, float] = {}
    with Broker(d / "broker") as broker:
        edge = apps.edge_agent(d, "edge-idle", broker.url, d / "idle.db").start()
        try:
            out["memory.idle_mb"] = _settled_rss(edge.pid)
        finally:
            edge.stop()
    down = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    edge = apps.edge_agent(d, "edge-empty", down, d / "empty.db").start()
    try:
        out["memory.empty_down_mb"] = _settled_rss(edge.pid)
    finally:
        edge.stop()

    seeded = ctx.workdir / "memory-outbox.db"
    if not seeded.exists():
        took = seed_direct(seeded, s.memory_entries)
        log.info("seeded %d outbox rows directly in %.1f s (%.0f MiB)", s.memory_entries,
                 took, seeded.stat().st_size / 2**20)
    edge = apps.edge_agent(d, "edge-full", down, seeded)
    start = time.perf_counter()
    edge.start(timeout=300)
    out["memory.start_seconds"] = time.perf_counter() - start
    try:
        depth = edge_health(edge)["outbox_depth"]
        if depth != s.memory_entries:
            raise RuntimeError(f"edge sees {depth} entries, expected {s.memory_entries}")
        out["memory.full_down_mb"] = _settled_rss(edge.pid)
    finally:
        edge.stop()
    out["memory.growth_mb"] = out["memory.full_down_mb"] - out["memory.empty_down_mb"]
    out.update(robot_waves(ctx, d))
    log.info("edge RSS: idle %.1f MiB, empty/down %.1f MiB, 1M/down %.1f MiB",
             out["memory.idle_mb"], out["memory.empty_down_mb"], out["memory.full_down_mb"])
    return out
