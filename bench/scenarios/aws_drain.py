"""Issue 27: draining an outage's backlog to AWS IoT Core's per-connection limits.

The edge agent on the ``awsiot`` backend (real awscrt) publishes through a shaping proxy
(bench/shaper.py: mutual TLS, 100 publishes/s and 512 KiB/s per connection, violations
counted) to a Mosquitto requiring client certificates; a callback server stores what
arrives in SQLite. The outbox starts with ``ENTRIES`` entries of the realistic mix (100
robots), and fresh status changes are posted to the agent's webhook during the drain.
Figures: drain time against the limit's own (what was published / 100 per s), violations, loss,
out-of-order merges per robot and channel, the time until every robot's newest state is
in the cloud database (against the drain time, which is what oldest-first costs), how
long the fresh changes took from their post to the cloud database (target: within 2 s),
and the same drain with batch frames (its time, and billed 5 KiB units per envelope).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench import apps
from bench.procs import Broker, free_port
from bench.samples import CALLBACK_CODE, envelopes
from bench.scenarios.common import edge_health
from bench.settings import RunContext
from bridge import frames
from bridge.outbox import Outbox
from bridge.outbox.priority import STATE_CHANNELS
from tests.support.tls_certs import CertAuthority

log = logging.getLogger(__name__)

ENTRIES = 6000  # 36,000 with --long (AWS_DRAIN_ENTRIES)
ROBOTS = 100
LIMIT = 100.0  # publishes/s
FRESH_EVERY = 0.5  # s between fresh status changes posted during the drain


Sent = dict[str, tuple[str, str, float]]


async def _fill(path: Path, org: str, gateway: str, count: int) -> Sent:
    """The backlog; returns id -> (device, channel, ts)."""
    out: Sent = {}
    async with Outbox(path) as outbox:
        for topic, payload, key in envelopes(count, org=org, gateway=gateway, robots=ROBOTS,
                                             tag="awsdrain"):
            env = json.loads(payload)
            # As the webhook puts it: with its robot time (the drain orders by it).
            await outbox.put(topic, payload, compact_key=key, order=env["ts"])
            out[env["id"]] = (env["device"], env["channel"], env["ts"])
    return out


def _stored(db: Path, ids: list[str]) -> int:
    """How many of ``ids`` the cloud has stored (one cheap query: the proxy shares this
    process, and a long hold of the GIL here would bunch the publishes it measures)."""
    marks = ",".join("?" * len(ids))
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM mqtt_message_log WHERE id IN"
                                    f" ({marks})", ids).fetchone()[0])
    except sqlite3.Error:
        return 0


def _log_rows(db: Path) -> list[tuple[str, str]]:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT id, payload FROM mqtt_message_log ORDER BY rowid"
                                ).fetchall()
    except sqlite3.Error:
        return []


def _fresh_latencies(db: Path, posted: dict[tuple[str, int], float]) -> list[float]:
    """Seconds from each fresh change's post (wall clock, by robot and notify_timestamp)
    to its storing in the cloud database (``stored_at``, same machine, same clock)."""
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT device_id, payload, stored_at FROM mqtt_message_log"
                                " WHERE device_id LIKE 'fresh%'").fetchall()
    except sqlite3.Error:
        return []
    out = []
    for device, payload, stored_at in rows:
        at = posted.get((device, round(float(json.loads(payload)["ts"]) * 1000)))
        if at is not None:
            stored = dt.datetime.fromisoformat(stored_at).replace(tzinfo=dt.UTC)
            out.append(stored.timestamp() - at)
    return out


def _drain(ctx: RunContext, name: str, broker: Broker, tls_port: int, ca: CertAuthority,
           count: int, **env: str) -> dict[str, float]:
    d = ctx.dir(f"aws_drain-{name}")
    db = d / "cloud.db"
    org, gateway = "acme", "gw-aws"
    backlog = asyncio.run(_fill(d / "outbox.db", org, gateway, count))
    newest: dict[str, str] = {}
    for ident, (dev, channel, ts) in backlog.items():  # each robot's newest state
        if channel not in STATE_CHANNELS:
            continue
        key = f"{dev}/{channel}"
        if key not in newest or backlog[newest[key]][2] <= ts:
            newest[key] = ident
    want = list(newest.values())
    shaper_cert = ca.issue(f"shaper-{name}", server=True)
    gw = ca.issue(f"gw-{name}")
    port_file, counts_file = d / "shaper.port", d / "shaper.json"
    shaper = subprocess.Popen([sys.executable, "-m", "bench.shaper", str(tls_port),
                               str(ca.cert), str(shaper_cert.cert), str(shaper_cert.key),
                               str(gw.cert), str(gw.key), str(port_file), str(counts_file)])
    deadline = time.monotonic() + 20
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or shaper.poll() is not None:
            raise RuntimeError("the shaping proxy did not start")
        time.sleep(0.05)  # polling for the file is the readiness signal
    shaper_port = int(port_file.read_text())
    fresh: list[str] = []
    posted: dict[tuple[str, int], float] = {}  # (robot, notify_timestamp) -> when posted
    try:
        with apps.callback_server(d, "cloud", broker.url, f"sqlite:///{db}",
                                  client_id=f"cloud-{name}"), \
                apps.edge_agent(d, "edge", f"mqtts://127.0.0.1:{shaper_port}",
                                d / "outbox.db", org=org, gateway=gateway,
                                MQTT_BACKEND="awsiot", MQTT_CA_FILE=str(ca.cert),
                                MQTT_CERT_FILE=str(gw.cert), MQTT_KEY_FILE=str(gw.key),
                                MQTT_CLIENT_ID=f"gw-aws-{name}", **env) as edge:
            started = time.monotonic()
            newest_at = None
            last_post = 0.0
            with httpx.Client(base_url=f"http://127.0.0.1:{edge.port}",
                              headers={"CallbackCode": CALLBACK_CODE}) as client:
                while True:
                    now = time.monotonic()
                    h = edge_health(edge)
                    if now - last_post >= FRESH_EVERY and h["outbox_depth"] > 50:
                        last_post = now
                        sn = f"fresh{len(fresh) % 10}"
                        at = time.time()
                        stamp = int(at * 1000)
                        r = client.post("/api/pudu/webhook", json={
                            "callback_type": "notifyRobotStatus",
                            "data": {"sn": sn, "robot_state": "busy",
                                     "notify_timestamp": stamp}})
                        if r.status_code == 200:
                            fresh.append(sn)
                            posted[(sn, stamp)] = at
                    if newest_at is None and _stored(db, want) == len(want):
                        newest_at = time.monotonic() - started
                    if h["outbox_depth"] == 0 and h["inflight"] == 0 and newest_at is not None:
                        break
                    if now - started > 30 + 3 * count / LIMIT:
                        raise RuntimeError(f"aws_drain {name}: not drained: {h}")
                    time.sleep(0.2)
            drained = time.monotonic() - started
            time.sleep(1.0)  # the last commits at the cloud
            rows = _log_rows(db)
    finally:
        shaper.terminate()
        shaper.wait(10)
    counts = json.loads(counts_file.read_text())
    stored = {}
    ooo = 0
    merged: dict[tuple[str, str], float] = {}
    for ident, payload in rows:
        env_ = json.loads(payload)
        stored[ident] = env_
        if env_.get("replay") or env_.get("channel") not in STATE_CHANNELS:
            continue  # merged into state: the state channels' messages not marked replay
        stream = (str(env_.get("device", "")), str(env_.get("channel", "")))
        ts = float(env_.get("ts", 0))
        if ts < merged.get(stream, float("-inf")):
            ooo += 1
        merged[stream] = max(ts, merged.get(stream, ts))
    lost = sum(1 for i in backlog if i not in stored)
    latencies = _fresh_latencies(db, posted)
    units = sum(frames.billed_units(max(size - 60, 1)) for size in counts["sizes"])
    return {
        f"aws_drain.{name}_s": drained,
        # against the limit's own time for what went out: the backlog, the fresh
        # changes posted during the drain and the agent's presence
        f"aws_drain.{name}_vs_limit": drained / (max(count, counts["publishes"]) / LIMIT),
        f"aws_drain.{name}_violations": float(counts["violations"]),
        f"aws_drain.{name}_lost": float(lost),
        f"aws_drain.{name}_out_of_order": float(ooo),
        f"aws_drain.{name}_newest_state_s": float(newest_at or drained),
        f"aws_drain.{name}_units_per_envelope": units / max(len(stored), 1),
        f"aws_drain.{name}_publishes": float(counts["publishes"]),
        # fresh status changes posted during the drain: post -> stored (target: <= 2 s)
        f"aws_drain.{name}_fresh_posted": float(len(posted)),
        f"aws_drain.{name}_fresh_unstored": float(len(posted) - len(latencies)),
        f"aws_drain.{name}_fresh_median_s": statistics.median(latencies or [math.inf]),
        f"aws_drain.{name}_fresh_max_s": max(latencies or [math.inf]),
    }


def run(ctx: RunContext) -> dict[str, float]:
    count = ENTRIES * (6 if ctx.settings.long else 1)
    base = ctx.dir("aws_drain")
    ca = CertAuthority(base / "pki", "bench")
    server = ca.issue("broker", server=True)
    broker = Broker(base / "broker")
    tls_port = free_port()
    with broker.conf.open("a") as conf:
        conf.write(f"listener {tls_port} 127.0.0.1\ncafile {ca.cert}\n"
                   f"certfile {server.cert}\nkeyfile {server.key}\n"
                   "require_certificate true\n")
    with broker:
        out = _drain(ctx, "single", broker, tls_port, ca, count)
        out |= _drain(ctx, "frames", broker, tls_port, ca, count, BATCH_FRAMES="on")
    out["aws_drain.frames_speedup"] = out["aws_drain.single_s"] / out["aws_drain.frames_s"]
    log.info("aws_drain: %s", out)
    return out
