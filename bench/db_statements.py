"""Where MariaDB's time goes in HTTP ingest: each statement shape's share.

``python -m bench.db_statements [--duration 8] [--database-url URL]`` (not in ``make
bench``: it explains target 10a's database half rather than measuring it). A callback
server on a private Mosquitto, saturated by wrk with one envelope per POST as
``ingest_http`` does, while MariaDB logs every statement to ``mysql.slow_log``
(``long_query_time=0``, ``log_output=TABLE``: read over SQL, so a database on another
host works too; the settings are put back afterwards). Prints each statement shape
(literals folded) with its count, its share of the statements' summed time, mean time
and rows examined, and the server's ``Com_*`` and handler counters per stored envelope.
Logging every statement slows the server, so the rate is lower than the scenario's;
the shares are what to read. Needs a user allowed ``SET GLOBAL`` (the bench's root).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path

from bench import apps, db
from bench.procs import Broker
from bench.scenarios import ingest_http
from bench.settings import BenchSettings, RunContext

#: The server's counters worth reading per stored envelope.
COUNTERS = ("Com_commit", "Com_insert", "Com_insert_select", "Com_select", "Questions",
            "Handler_read_key", "Handler_write", "Handler_update",
            "Innodb_buffer_pool_read_requests", "Innodb_log_writes")
_LOGGING = ("slow_query_log", "long_query_time", "log_output")


def _shape(sql: str) -> str:
    """The statement with its literals folded, so a batch of any size has one shape."""
    sql = re.sub(r"'(?:[^'\\]|\\.)*'", "?", sql)
    sql = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", "N", sql)
    sql = re.sub(r"\((?:\s*[?N]\s*,?)+\)", "(…)", sql)
    sql = re.sub(r"(?:\(…\)\s*,?\s*)+", "(…) ", sql)
    return " ".join(sql.split())


def _globals(url: str, names: tuple[str, ...]) -> dict[str, str]:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN ("
                    + ", ".join(["%s"] * len(names)) + ")", names)
        return {str(k): str(v) for k, v in cur.fetchall()}


def _counters(url: str) -> dict[str, int]:
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN ("
                    + ", ".join(["%s"] * len(COUNTERS)) + ")", COUNTERS)
        return {str(k): int(v) for k, v in cur.fetchall()}


def _set(url: str, values: dict[str, str]) -> None:
    with db.connect(url) as conn, conn.cursor() as cur:
        for name, value in values.items():
            quoted = value if value.replace(".", "").isdigit() else f"'{value}'"
            cur.execute(f"SET GLOBAL {name} = {quoted}")


def _logged(url: str) -> list[tuple[float, int, str]]:
    """(seconds, rows examined, text) of every logged statement of the bench database."""
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT TIME_TO_SEC(query_time), rows_examined, CONVERT(sql_text USING "
                    "utf8mb4) FROM mysql.slow_log WHERE db = DATABASE()")
        return [(float(t), int(r), str(q)) for t, r, q in cur.fetchall()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--database-url", default=BenchSettings().database_url)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    settings = BenchSettings(duration=args.duration, database_url=args.database_url)
    url = settings.database_url
    with tempfile.TemporaryDirectory(prefix="bench-db-statements-") as tmp:
        ctx = RunContext(settings, Path(tmp), 0)
        d = ctx.dir("db_statements")
        bodies = ingest_http._bodies(int(args.duration * 6_000), 1, settings.robots)
        db.ensure_database(url)  # a fresh machine, before any `make bench`
        db.reset(url)
        before = _globals(url, _LOGGING)
        # Before the service connects: a session takes long_query_time when it opens.
        _set(url, {"log_output": "TABLE", "long_query_time": "0", "slow_query_log": "1"})
        try:
            with Broker(d / "broker") as broker, apps.callback_server(
                    d, "callback-statements", broker.url, url,
                    client_id=f"bench-statements-{time.time_ns()}") as svc:
                with db.connect(url) as conn, conn.cursor() as cur:
                    cur.execute("TRUNCATE mysql.slow_log")  # what start-up ran
                counters0 = _counters(url)
                run = ingest_http._saturate(ctx, svc, bodies, lambda: ingest_http._stored(svc),
                                            db.server_pid(url))
                counters = _counters(url)
        finally:
            _set(url, before)
        statements = _logged(url)
    total = sum(t for t, _, _ in statements) or 1.0
    by_shape: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0])
    for seconds, examined, sql in statements:
        agg = by_shape[_shape(sql)[:160]]
        agg[0] += 1
        agg[1] += seconds
        agg[2] += examined
    print(f"HTTP ingest, one envelope per POST, every statement logged: {run.rate:,.0f} "
          f"envelopes/s, {run.stored:,.0f} stored; {len(statements):,} statements, "
          f"{total:.2f} s of statement time")
    print(f"{'share':>6} {'count':>7} {'mean µs':>8} {'rows':>6}  statement")
    for shape, (count, seconds, examined) in sorted(by_shape.items(),
                                                    key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{100 * seconds / total:5.1f}% {count:7,} {1e6 * seconds / count:8,.0f} "
              f"{examined / count:6.1f}  {shape}")
    print("per stored envelope: " + ", ".join(
        f"{name} {(counters[name] - counters0.get(name, 0)) / run.stored:.3f}"
        for name in COUNTERS if name in counters))


if __name__ == "__main__":
    main()
