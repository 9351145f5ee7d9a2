"""``make run`` (``python -m demo``): the whole pipeline in one process on its embedded defaults.

An in-process MQTT broker, the edge agent on :8000 (admin listener with /metrics and the
proxy on 127.0.0.1:8001), the callback server on :3005 and SQLite under ./data/. Nothing
beyond Python is needed. Ports and paths can be changed with the services' usual
environment variables. Each run makes a new demo admin key (written, hashed, to
``DEMO_KEYS_FILE``, default data/demo-keys.yaml) and prints it in the curl lines, with
the console's address to sign in to with it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from bridge.embedded_broker import EmbeddedBroker
from bridge.errors import FleetError
from bridge.http.server import make_server
from bridge.service.lifecycle import EXIT_CONFIG, Listener, run_main, serve_service
from bridge.service.logs import setup_logging
from bridge.service.sdnotify import Notifier, Watchdog
from callback_server import settings as cb_config
from callback_server.keys import ALL_ORGS, add_key
from callback_server.service import CallbackServer
from edge_agent import settings as edge_config
from edge_agent.service import EdgeAgent

DEMO_CODE = "demo-callback-code"
DEMO_KEY_NAME = "demo-admin"


def _free(port: int) -> int:
    """``port`` if free, else another free one (a local Mosquitto may hold 1883)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _demo_key(path: Path) -> str:
    """A fresh all-org admin key, the only one in ``path`` (the demo's own keys file)."""
    path.unlink(missing_ok=True)
    return add_key(path, DEMO_KEY_NAME, [ALL_ORGS], "admin")


def _banner(edge_port: int, admin_port: int, cb_port: int, code: str, key: str) -> str:
    # The robot's time is the shell's clock when the line is run ($(date +%s)), so the
    # sample robot is fresh in the console however long after the banner it is pasted.
    body = ('{"callback_type":"notifyRobotStatus","data":{"sn":"DEMO-1","battery":87,'
            '"run_state":"IDLE","charge_stage":"CHARGING","timestamp":\'"$(date +%s)"\'}}')
    return f"""
Demo admin key (all orgs; new each run): {key}

Console: http://localhost:{cb_port}/  (sign in with the key above)

Pipeline running: Pudu webhook :{edge_port} -> outbox -> MQTT (embedded broker)
                  -> callback server :{cb_port} -> SQLite (./data)

  curl -s -X POST localhost:{edge_port}/api/pudu/webhook -H 'CallbackCode: {code}' \\
       -H 'Content-Type: application/json' -d '{body}'
  curl -s localhost:{cb_port}/robots/DEMO-1 -H 'Authorization: Bearer {key}'
  curl -s 'localhost:{cb_port}/robots?limit=10' -H 'Authorization: Bearer {key}'
  curl -s localhost:{edge_port}/api/pudu/webhook/health
  curl -s localhost:{admin_port}/metrics
  curl -s -X POST localhost:{cb_port}/devices/demo-gateway/commands \\
       -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
       -d '{{"command":"get_status"}}'
  curl -s -X POST localhost:{admin_port}/mqtt/publish -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"topic":"org/demo/device/demo-gateway/telemetry","payload":{{"hello":1}}}}'

Ctrl-C stops everything.
"""


@contextlib.asynccontextmanager
async def _pipeline(broker: EmbeddedBroker, agent: EdgeAgent, server: CallbackServer
                    ) -> AsyncIterator[None]:
    """The three parts as one service for bridge.service.lifecycle: broker first, out last."""
    async with broker, agent, server:
        yield


async def main() -> None:
    env = os.environ
    broker_port = _free(int(env.get("DEMO_MQTT_PORT", "1883")))
    keys_file = Path(env.get("DEMO_KEYS_FILE", "data/demo-keys.yaml"))
    key = _demo_key(keys_file)
    broker = EmbeddedBroker("127.0.0.1", broker_port)
    defaults = {
        "PUDU_CALLBACK_CODE": DEMO_CODE, "ORG_ID": "demo", "GATEWAY_ID": "demo-gateway",
        "OUTBOX_PATH": "data/outbox.db",
        "DATABASE_URL": "sqlite:///data/callback.db", "MQTT_CLIENT_ID": "",
    }
    merged = {**defaults, **env, "MQTT_URL": broker.url}
    # The same key opens the edge's proxy (its one token) and, by hash, the cloud side.
    edge = edge_config.load(None, {**merged, "MQTT_CLIENT_ID": "", "PROXY_TOKEN": key})
    cloud = cb_config.load(None, {**merged, "API_KEYS_FILE": str(keys_file)})
    agent, server = EdgeAgent(edge), CallbackServer(cloud)

    def listeners() -> list[Listener]:
        return [
            Listener("webhook", edge.http_host, edge.http_port,
                     make_server(agent.app, edge.http_host, edge.http_port, agent.nodelay,
                                 edge.http_limits)),
            Listener("callback server", cloud.http_host, cloud.http_port,
                     make_server(server.app, cloud.http_host, cloud.http_port,
                                 server.nodelay, cloud.http_limits)),
            Listener("edge admin", edge.admin_host, edge.admin_port,
                     make_server(agent.admin_app, edge.admin_host, edge.admin_port,
                                 agent.nodelay, edge.http_limits)),
        ]

    def banner() -> None:  # every listener is bound and serving: the curls work now
        print(_banner(edge.http_port, edge.admin_port, cloud.http_port,
                      edge.pudu_callback_code.get_secret_value(), key), flush=True)

    def end_streams() -> None:
        agent.proxy.end_streams()
        server.end_streams()

    notifier = Notifier({})  # not under systemd
    # The same lifecycle as the services: a port in use is one line and exit 3 before the
    # banner or the broker; SIGTERM/SIGINT are handled there and nowhere else.
    await serve_service(_pipeline(broker, agent, server), listeners, notifier=notifier,
                        watchdog=Watchdog(notifier), status=lambda: "demo",
                        end_streams=end_streams, on_ready=banner)


def run() -> int:
    setup_logging(os.environ.get("LOG_LEVEL", "WARNING").upper(), json_lines=False)
    try:
        return run_main("make run", main())
    except FleetError as exc:  # a listener or the embedded broker failed while running
        print(f"make run: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(run())
