"""Target 3: the callback server alone, MQTT -> MariaDB, against a bare paho subscriber.

N envelopes (the edge's own output for the sample mix) are queued at the broker for
persistent sessions before the consumer starts, so the publisher takes no CPU while the
consumer is measured. All use a shared subscription ``$share/{group}/org/+/device/+/#``
(how replicas are deployed: docs/deployment.md), a new group per phase, and each
phase's sessions are ended afterwards so no stale session takes a share. With two
replicas Mosquitto splits the queue between their sessions. The rate runs from the
first commit (or delivery) to the last: for the callback servers from the log's
``stored_at`` (one value per batch), since their HTTP (/metrics, health) only starts
once the queue is nearly drained; for the raw subscriber its own first and last
delivery times. Completion is detected by polling ``COUNT(*)`` every 100 ms.
"""

from __future__ import annotations

import logging
import math
import time

from bench import apps, db
from bench.mqtt import Subscriber, create_session, forget_session, publish
from bench.procs import Broker, Service, cpu_seconds, http_ok
from bench.scenarios.common import wait_until
from bench.scenarios.profiling import DatabaseProfiler, Profiler, profile_callback
from bench.settings import RunContext

log = logging.getLogger(__name__)

STALL_SECONDS = 60.0
RESTART_SECONDS = 2.0  # systemd/callback-server.service: Restart=always, RestartSec=2
MAX_CRASHES = 5


def _filter(group: str) -> str:
    return f"$share/{group}/org/+/device/+/#"


def _commit_rate(url: str, count: int) -> float:
    """Messages/s from the log's ``stored_at``: one value per batch, taken when the batch
    is built. Between the first batch's and the last batch's build, every batch but the
    last was built and committed."""
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT stored_at, COUNT(*) FROM {db.LOG_TABLE} "
                    "GROUP BY stored_at ORDER BY stored_at")
        batches = [(db.epoch(at), int(n)) for at, n in cur.fetchall()]
    if len(batches) < 2 or batches[-1][0] <= batches[0][0]:
        return float("nan")
    return (count - batches[-1][1]) / (batches[-1][0] - batches[0][0])


def _drain(ctx: RunContext, broker: Broker, replicas: int, count: int, *,
           profile: bool = False) -> tuple[float, float, int, float, float]:
    """Queue ``count`` messages for ``replicas`` sessions, start the replicas: the rate
    the messages are committed at, how long the first replica took to answer
    /callback/health (it starts serving HTTP only once subscribed), how often a
    replica exited and was restarted (like systemd's ``Restart=always``, after 2 s),
    and the replicas' CPU µs per envelope committed from the first poll that saw a row
    to the last (start-up's imports and connects left out; NaN after a restart), and the
    database server's over the same window (NaN where it is not on this machine)."""
    d = ctx.dir(f"consumer-x{replicas}{'-profile' if profile else ''}")
    url = ctx.settings.database_url
    db.reset(url)
    tag = f"c{replicas}{ctx.run}{time.time_ns() % 10**8}"
    group = f"bench-{tag}"
    ids = [f"bench-cs-{tag}-{i}" for i in range(replicas)]
    for client_id in ids:
        create_session(broker.port, _filter(group), client_id)
    publish(broker.port, count, org="bench", tag=tag)
    servers = [apps.callback_server(d, f"callback-{i}", broker.url, url, client_id=cid,
                                    share_group=group) for i, cid in enumerate(ids)]
    profiler: Profiler | None = None
    db_profiler: DatabaseProfiler | None = None
    health_wait = float("nan")
    crashes = 0
    cpu_from: tuple[float, float, int] | None = None
    cpu_us = db_cpu_us = float("nan")
    db_pid = db.server_pid(url)
    try:
        launched = time.monotonic()
        for svc in servers:
            svc.launch()
        if profile:
            profiler = profile_callback(ctx, servers[0])
            if db_pid is not None:
                db_profiler = DatabaseProfiler(ctx, db_pid, "mariadb-drain", 8.0,
                                               "while one callback server drains its queue")
        last_n, last_progress = 0, time.monotonic()
        while True:
            for svc in servers:
                if svc.proc is not None and svc.proc.poll() is not None:
                    crashes += 1
                    if crashes > MAX_CRASHES:
                        raise RuntimeError(f"{svc.name} exited: {svc.log_tail()}")
                    log.warning("%s exited with %s: %s; restarting it in %.0f s as systemd "
                                "would", svc.name, svc.proc.returncode, _last_error(svc),
                                RESTART_SECONDS)
                    time.sleep(RESTART_SECONDS)
                    svc.launch()
            if math.isnan(health_wait) and http_ok(servers[0].url + "/callback/health"):
                health_wait = time.monotonic() - launched
            stored = db.count(url, db.LOG_TABLE)
            if stored >= count:
                if cpu_from is not None and crashes == 0:
                    cpu = sum(cpu_seconds(svc.pid) for svc in servers) - cpu_from[0]
                    cpu_us = cpu / (stored - cpu_from[2]) * 1e6
                    db_cpu_us = (db.server_cpu(db_pid) - cpu_from[1]) / (stored - cpu_from[2]) * 1e6
                break
            if stored and cpu_from is None:
                cpu_from = (sum(cpu_seconds(svc.pid) for svc in servers),
                            db.server_cpu(db_pid), stored)
            if stored > last_n:
                last_n, last_progress = stored, time.monotonic()
            elif time.monotonic() - last_progress > STALL_SECONDS:
                raise TimeoutError(f"stalled at {stored} of {count} committed")
            time.sleep(0.1)  # polling the row count: the commits are the event
        if math.isnan(health_wait):
            wait_until(lambda: http_ok(servers[0].url + "/callback/health"), timeout=60,
                       what="callback health")
            health_wait = time.monotonic() - launched
        rate = _commit_rate(url, count)
    finally:
        if profiler is not None:
            profiler.finish()
        if db_profiler is not None:
            db_profiler.finish()
        for svc in servers:
            svc.stop()
        for client_id in ids:
            forget_session(broker.port, client_id)
    return rate, health_wait, crashes, cpu_us, db_cpu_us


def _last_error(svc: Service) -> str:
    lines = [x for x in svc.log_tail(4000).splitlines() if x.strip()]
    return lines[-1][-300:] if lines else "no output"


def _raw(ctx: RunContext, broker: Broker, count: int) -> float:
    tag = f"r{ctx.run}{time.time_ns() % 10**8}"
    client_id, group = f"bench-raw-{tag}", f"bench-{tag}"
    create_session(broker.port, _filter(group), client_id)
    try:
        publish(broker.port, count, org="bench", tag=tag)
        raw = Subscriber(broker.port, _filter(group), count, client_id=client_id,
                         persistent=True).wait_ready().result()
    finally:
        forget_session(broker.port, client_id)
    if raw["unique"] < count:
        raise RuntimeError(f"raw subscriber got {raw['unique']} of {count}")
    return float(raw["rate"])


def run(ctx: RunContext) -> dict[str, float]:
    count = ctx.settings.consumer_messages
    out: dict[str, float] = {}
    with Broker(ctx.dir("consumer") / "broker") as broker:
        out["consumer.raw_rate"] = _raw(ctx, broker, count)
        log.info("raw_mqtt drain: %.0f msg/s", out["consumer.raw_rate"])
        (one, out["consumer.health_wait_s"], crashes_one, out["consumer.one_cpu_us"],
         out["consumer.one_db_cpu_us"]) = _drain(ctx, broker, 1, count)
        out["consumer.one_rate"] = one
        log.info("callback server x1: %.0f msg/s (%.0f µs CPU each, the database %.0f); "
                 "health answered after %.1f s", one, out["consumer.one_cpu_us"],
                 out["consumer.one_db_cpu_us"], out["consumer.health_wait_s"])
        out["consumer.two_rate"], _, crashes_two, _, _ = _drain(ctx, broker, 2, count)
        out["consumer.crashes"] = crashes_one + crashes_two
        log.info("callback server x2: %.0f msg/s", out["consumer.two_rate"])
        if ctx.settings.profile and ctx.run == 0:
            _drain(ctx, broker, 1, count, profile=True)  # extra pass, not reported
    out["consumer.one_vs_raw"] = out["consumer.one_rate"] / out["consumer.raw_rate"]
    out["consumer.two_vs_one"] = out["consumer.two_rate"] / out["consumer.one_rate"]
    return out
