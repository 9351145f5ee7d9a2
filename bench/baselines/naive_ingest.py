"""The naive cloud ingest: Flask, one upsert per envelope and a commit per request.

The baseline of target 10 (``POST /callback/messages``, the IoT Rule HTTP path). Run
under gunicorn with 2 sync workers, like ``naive_webhook``::

    NAIVE_DATABASE_URL=mysql://root:@127.0.0.1:3306/pudu_bench \\
        gunicorn -w 2 -b 127.0.0.1:8080 bench.baselines.naive_ingest:app

The body is one envelope or a JSON array of them (AWS's batched HTTP action). Each
envelope is upserted by its (org, id) with PyMySQL, then the request commits once. Not
sabotaged: each worker connects once; no validation, no dedup answer, no dead letters.
The table is created by the bench (``TABLE_DDL``) before the run.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import pymysql
from flask import Flask, Response, request

from bench.baselines.naive_webhook import connect

TABLE = "bench_naive_messages"
TABLE_DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    org VARCHAR(64) NOT NULL,
    id VARCHAR(128) NOT NULL,
    topic VARCHAR(255) NOT NULL,
    device VARCHAR(64) NOT NULL,
    type VARCHAR(64) NOT NULL,
    ts DOUBLE NOT NULL,
    payload MEDIUMTEXT NOT NULL,
    stored_at DATETIME(3) NOT NULL,
    PRIMARY KEY (org, id)
)
"""
UPSERT = f"""
INSERT INTO {TABLE} (org, id, topic, device, type, ts, payload, stored_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, NOW(3))
ON DUPLICATE KEY UPDATE ts = VALUES(ts), payload = VALUES(payload),
    stored_at = VALUES(stored_at)
"""

app = Flask(__name__)
_local = threading.local()


def _connection() -> pymysql.connections.Connection[Any]:
    conn = getattr(_local, "conn", None)
    if conn is None:  # once per worker process (gunicorn forks after import)
        conn = _local.conn = connect(os.environ["NAIVE_DATABASE_URL"])
    return conn


@app.post("/callback/messages")
def messages() -> Response:
    body = json.loads(request.get_data())
    envelopes = body if isinstance(body, list) else [body]
    conn = _connection()
    with conn.cursor() as cur:
        for env in envelopes:
            topic = env.get("topic") or f"org/{env['org']}/device/{env['device']}/{env['channel']}"
            cur.execute(UPSERT, (env["org"], env["id"], topic, env["device"], env["type"],
                                 env["ts"], json.dumps(env)))
    conn.commit()
    return Response(json.dumps({"status": "success", "stored": len(envelopes)}),
                    status=200, mimetype="application/json")
