"""The seed design of the cloud side: Flask, one upsert + commit per callback.

Run under gunicorn with 2 sync workers::

    NAIVE_DATABASE_URL=mysql://root:@127.0.0.1:3306/pudu_bench \\
        gunicorn -w 2 -b 127.0.0.1:8080 bench.baselines.naive_webhook:app

Not sabotaged: each worker connects once and keeps its connection (a connect per
request would also pay PyMySQL's TLS-context cost, docs/measured.md). The table is created
by the bench (``TABLE_DDL``) before the run.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

import pymysql
from flask import Flask, Response, request

TABLE = "bench_naive_robot_state"
TABLE_DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    robot_sn VARCHAR(64) NOT NULL PRIMARY KEY,
    callback_type VARCHAR(64) NOT NULL,
    status VARCHAR(32) NULL,
    battery_level INT NULL,
    x DOUBLE NULL,
    y DOUBLE NULL,
    yaw DOUBLE NULL,
    ts BIGINT NULL,
    payload TEXT NOT NULL,
    updated_at DATETIME(3) NOT NULL,
    callbacks INT NOT NULL DEFAULT 1
)
"""
UPSERT = f"""
INSERT INTO {TABLE}
    (robot_sn, callback_type, status, battery_level, x, y, yaw, ts, payload, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, NOW(3))
ON DUPLICATE KEY UPDATE
    callback_type = VALUES(callback_type),
    status = COALESCE(VALUES(status), status),
    battery_level = COALESCE(VALUES(battery_level), battery_level),
    x = COALESCE(VALUES(x), x), y = COALESCE(VALUES(y), y), yaw = COALESCE(VALUES(yaw), yaw),
    ts = VALUES(ts), payload = VALUES(payload), updated_at = VALUES(updated_at),
    callbacks = callbacks + 1
"""

app = Flask(__name__)
_local = threading.local()


def connect(url: str) -> pymysql.connections.Connection[Any]:
    parts = urlsplit(url)
    return pymysql.connect(
        host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
        user=unquote(parts.username or "root"), password=unquote(parts.password or ""),
        database=parts.path.lstrip("/") or "test", autocommit=False, charset="utf8mb4",
    )


def _connection() -> pymysql.connections.Connection[Any]:
    conn = getattr(_local, "conn", None)
    if conn is None:  # once per worker process (gunicorn forks after import)
        conn = _local.conn = connect(os.environ["NAIVE_DATABASE_URL"])
    return conn


@app.post("/api/pudu/webhook")
def webhook() -> Response:
    body = json.loads(request.get_data())
    data = body["data"]
    ext = data.get("extend_info") or {}
    pos = ext.get("position") or {}
    conn = _connection()
    with conn.cursor() as cur:
        cur.execute(UPSERT, (
            str(data.get("sn") or ext.get("sn")), body["callback_type"],
            data.get("run_status") or data.get("run_state") or data.get("state"),
            data.get("power") if "power" in data else data.get("battery", ext.get("battery")),
            data.get("x", pos.get("x")), data.get("y", pos.get("y")),
            data.get("yaw", pos.get("yaw")), data.get("timestamp"), json.dumps(data),
        ))
    conn.commit()
    return Response('{"status":"success"}', status=200, mimetype="application/json")
