"""Target 4: a backlog built while the broker was down drains at a useful fraction of
what paho can publish at all, in order per robot, none lost.

Each time, the broker is stopped, the outbox is seeded through
``bridge.outbox.Outbox.put`` in this process (the real write path minus HTTP; puts
issued 1,000 at a time so group commit applies) with the edge's own envelopes, the
edge agent is started on it, then the broker. The drain rate runs from the first PUBACK
the edge counts (``edge_published_total``, polled every 50 ms) to the last.

Two drains: one to a verifying subscriber (its persistent session exists before the
broker goes down, so nothing is missed; it checks loss, duplicates and per-robot order
by robot time), and one with no subscriber, which is compared with the baseline:
``raw_mqtt publish`` of as many envelopes (QoS 1, window 100, every rc checked) to the
same broker, also without a subscriber, from its first publish to its last PUBACK. A
Python subscriber on the same two cores would cap both rates and hide the difference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from bench import apps
from bench.mqtt import Subscriber, create_session, forget_session, publish
from bench.procs import Broker
from bench.samples import envelopes
from bench.scenarios.common import edge_health, metric, run_async, wait_until
from bench.settings import RunContext
from bridge.outbox import Outbox

log = logging.getLogger(__name__)

FILTER = "org/+/device/+/#"


async def seed(path: Path, count: int, *, org: str, tag: str) -> float:
    """Put ``count`` envelopes through Outbox.put; returns puts per second."""
    messages = list(envelopes(count, org=org, tag=tag))
    start = time.perf_counter()
    async with Outbox(path, max_entries=max(count, 1_000_000)) as outbox:
        for at in range(0, count, 1000):
            await asyncio.gather(*(
                outbox.put(topic, payload, qos=1, compact_key=key)
                for topic, payload, key in messages[at:at + 1000]))
    return count / (time.perf_counter() - start)


def _drain(ctx: RunContext, broker: Broker, name: str, *,
           verifier: str | None = None) -> tuple[float, float, dict[str, Any] | None]:
    """Broker down, outbox seeded, edge started, broker up: (seed rate, drain rate, seen)."""
    count = ctx.settings.backlog_entries
    d = ctx.dir(f"backlog-{name}")
    broker.stop()  # the broker is down from here until the backlog is built
    outbox = d / "outbox.db"
    seed_rate = run_async(
        seed(outbox, count, org="bench", tag=f"b{ctx.run}{time.time_ns() % 10**8}"))
    edge = apps.edge_agent(d, "edge", broker.url, outbox).start()
    sub: Subscriber | None = None
    try:
        depth = edge_health(edge)["outbox_depth"]
        if depth != count:
            raise RuntimeError(f"edge sees {depth} entries, {count} were put")
        broker.start()
        if verifier is not None:
            sub = Subscriber(broker.port, FILTER, count, client_id=verifier, persistent=True)
            sub.wait_ready()

        def published() -> float:
            return metric(edge, "edge_published_total")

        first_t = wait_until(lambda: published() > 0, timeout=30, interval=0.05,
                             what="first PUBACK")
        first_n = published()
        done = wait_until(lambda: published() >= count, timeout=600, interval=0.05,
                          what="backlog drained")
        seen = sub.result() if sub is not None else None
    finally:
        if sub is not None:
            sub.kill()
        edge.stop()
    return seed_rate, (count - first_n) / (done - first_t), seen


def run(ctx: RunContext) -> dict[str, float]:
    count = ctx.settings.backlog_entries
    out: dict[str, float] = {}
    broker = Broker(ctx.dir("backlog") / "broker", persistence=True).start()
    try:
        verifier = f"bench-verify-{ctx.run}-{time.time_ns()}"
        create_session(broker.port, FILTER, verifier)
        seed_rate, rate, seen = _drain(ctx, broker, "verified", verifier=verifier)
        assert seen is not None
        forget_session(broker.port, verifier)
        out["backlog.seed_rate"] = seed_rate
        out["backlog.verified_rate"] = rate
        out["backlog.lost"] = count - seen["unique"]
        out["backlog.duplicates"] = seen["duplicates"]
        out["backlog.order_violations"] = seen["order_violations"]
        out["backlog.replayed"] = seen["replayed"]
        log.info("seeded %d through Outbox.put at %.0f puts/s; drained to a verifying "
                 "subscriber at %.0f msg/s (lost %d, dup %d, out of order %d, history "
                 "after the newest %d)", count, seed_rate, rate, out["backlog.lost"],
                 seen["duplicates"], seen["order_violations"], seen["replayed"])

        _, out["backlog.drain_rate"], _ = _drain(ctx, broker, "rate")
        log.info("edge drained %d at %.0f msg/s (no subscriber)", count,
                 out["backlog.drain_rate"])
        raw = publish(broker.port, count, org="bench", tag=f"p{ctx.run}{time.time_ns() % 10**8}")
        out["backlog.raw_rate"] = raw["rate"]
        log.info("raw paho publish: %.0f msg/s (no subscriber)", raw["rate"])
    finally:
        broker.stop()
    out["backlog.drain_vs_raw"] = out["backlog.drain_rate"] / out["backlog.raw_rate"]
    return out
