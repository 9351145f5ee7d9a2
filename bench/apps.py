"""How the bench starts each app under test: the product's services and the baselines."""

from __future__ import annotations

import os
from pathlib import Path

from bench.procs import Service, free_port, python_module, venv_script
from bench.samples import CALLBACK_CODE

REPO = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every child: the repo importable (``bench.*`` is not installed)."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO), **extra}


def edge_agent(log_dir: Path, name: str, mqtt_url: str, outbox: Path, *,
               org: str = "bench", gateway: str = "gw-bench", **extra: str) -> Service:
    """``python -m edge_agent run`` as deployed, its broker and outbox given."""
    port, admin = free_port(), free_port()
    env = child_env(
        PUDU_CALLBACK_CODE=CALLBACK_CODE,
        EDGE_HTTP_HOST="127.0.0.1",
        EDGE_HTTP_PORT=str(port),
        EDGE_ADMIN_PORT=str(admin),
        MQTT_URL=mqtt_url,
        ORG_ID=org,
        GATEWAY_ID=gateway,
        OUTBOX_PATH=str(outbox),
        MQTT_RECONNECT_MAX_SECONDS="1",
        LOG_LEVEL="INFO",
        **extra,
    )
    return Service(name, python_module("edge_agent", "run"), log_dir, port=port, env=env,
                   health_path="/api/pudu/webhook/health", admin_port=admin)


#: The bench's callback servers' token (an ingest and read key for every org).
CALLBACK_TOKEN = "bench-callback-token"


def callback_server(log_dir: Path, name: str, mqtt_url: str, database_url: str, *,
                    client_id: str, share_group: str | None = None,
                    port: int | None = None, **extra: str) -> Service:
    """``python -m callback_server run`` with a stable client id (persistent session) and
    the all-org token ``CALLBACK_TOKEN`` (its /metrics takes no less). ``port``: one
    already chosen (replicas sharing it with ``CALLBACK_HTTP_REUSE_PORT``)."""
    port = free_port() if port is None else port
    env = child_env(
        MQTT_URL=mqtt_url,
        DATABASE_URL=database_url,
        CALLBACK_HTTP_HOST="127.0.0.1",
        CALLBACK_HTTP_PORT=str(port),
        MQTT_CLIENT_ID=client_id,
        MQTT_RECONNECT_MAX_SECONDS="1",
        LOG_LEVEL="INFO",
        **{"CALLBACK_TOKEN": CALLBACK_TOKEN, **extra},
    )
    if share_group:
        env["SHARE_GROUP"] = share_group
    return Service(name, python_module("callback_server", "run"), log_dir, port=port,
                   env=env, health_path="/callback/health", token=env["CALLBACK_TOKEN"])


def echo(log_dir: Path, kind: str) -> Service:
    port = free_port()
    return Service(f"echo-{kind}",
                   python_module("bench.baselines.echo", kind, "--port", str(port)),
                   log_dir, port=port, env=child_env())


def naive_webhook(log_dir: Path, database_url: str,
                  module: str = "naive_webhook") -> Service:
    """A Flask baseline (``naive_webhook`` or ``naive_ingest``) under 2 gunicorn workers."""
    port = free_port()
    argv = [venv_script("gunicorn"), "-w", "2", "-k", "sync", "-b", f"127.0.0.1:{port}",
            "--log-level", "warning", f"bench.baselines.{module}:app"]
    return Service(module.replace("_", "-"), argv, log_dir, port=port,
                   env=child_env(NAIVE_DATABASE_URL=database_url))


def naive_forward(log_dir: Path, mqtt_port: int) -> Service:
    port = free_port()
    argv = python_module("bench.baselines.naive_forward", "--port", str(port),
                         "--mqtt-port", str(mqtt_port))
    return Service("naive-forward", argv, log_dir, port=port, env=child_env())
