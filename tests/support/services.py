"""Start the product's own services as real processes for integration tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.procs import free_port
from tests.support.waiting import NotYet, eventually

#: The callback server's PROXY_TOKEN unless a test gives its own.
ADMIN_TOKEN = "test-admin-token"


class ServiceProcess:
    """``python -m <module> run`` with an environment; stop by PID."""

    def __init__(self, module: str, env: Mapping[str, str], health_path: str, port: int,
                 log_path: Path, *, admin_port: int | None = None) -> None:
        self.module = module
        self.admin_port = admin_port
        token = env.get("PROXY_TOKEN")
        #: Headers of an admin key (the service's PROXY_TOKEN), for reading its API.
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.env = {**os.environ, **env}
        self.health_path = health_path
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        #: What runs it, and where (an installed venv's interpreter: run it elsewhere than
        #: the checkout, whose packages would shadow the installed ones).
        self.command = [sys.executable, "-m", module]
        self.cwd: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The edge agent's admin listener (/metrics, /docs, the REST proxy)."""
        assert self.admin_port is not None
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 20.0) -> ServiceProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            # A group of its own: what it leaves behind (a wrapper's child) is stopped too.
            self.proc = subprocess.Popen(
                [*self.command, "run"], env=self.env, stdout=log, stderr=log, cwd=self.cwd,
                start_new_session=True,
            )
        proc = self.proc
        with httpx.Client(timeout=1.0) as client:

            def ready() -> bool:  # polling the health endpoint: the readiness event
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.module} exited: {self.log_path.read_text()[-2000:]}")
                return client.get(self.url + self.health_path).status_code == 200

            try:
                eventually(ready, within=timeout, what=f"{self.module} ready",
                           ignoring=(httpx.TransportError,))
            except NotYet as exc:
                self.kill()
                raise NotYet(f"{exc}: {self.log_path.read_text()[-2000:]}") from None
        return self

    def health(self) -> dict[str, Any]:
        """The detailed health body (the callback server shows it only to a key)."""
        return httpx.get(self.url + self.health_path, headers=self.auth,  # type: ignore[no-any-return]
                         timeout=5).json()

    def metric(self, line_start: str) -> float:
        """The sum of the edge agent's ``/metrics`` samples whose line starts so (one
        sample when ``line_start`` names it whole, labels and all)."""
        text = httpx.get(self.admin_url + "/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(line_start))

    def wait_health(self, key: str, value: object, timeout: float = 20) -> None:
        """Poll the health endpoint until ``key`` has ``value`` (the service's own report)."""
        eventually(self.health, accept=lambda h: h.get(key) == value, within=timeout,
                   what=f"health {key} == {value!r}")

    def wait_health_at_least(self, key: str, value: float, timeout: float = 20) -> None:
        """Poll the health endpoint until the number ``key`` reaches ``value``."""
        eventually(self.health, accept=lambda h: float(h.get(key) or 0) >= value,
                   within=timeout, what=f"health {key} >= {value!r}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crash or power cut for the process)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._end_group()

    def _end_group(self) -> None:
        """SIGKILL whatever is left in the process's group once it has ended (a staged
        venv's interpreter behind a wrapper outlived the test that started it)."""
        if self.proc:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._end_group()
        return self.proc.returncode if self.proc else None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def edge_agent(tmp: Path, mqtt_url: str, *, org: str, gateway: str = "gw1",
               code: str = "test-code", **extra: str) -> ServiceProcess:
    port, admin_port = free_port(), free_port()
    env = {
        "PUDU_CALLBACK_CODE": code,
        "EDGE_HTTP_HOST": "127.0.0.1",
        "EDGE_HTTP_PORT": str(port),
        "EDGE_ADMIN_PORT": str(admin_port),
        "MQTT_URL": mqtt_url,
        "ORG_ID": org,
        "GATEWAY_ID": gateway,
        "OUTBOX_PATH": str(tmp / f"outbox-{gateway}.db"),
        "MQTT_RECONNECT_MAX_SECONDS": "1",
        "LOG_LEVEL": "INFO",
        **extra,
    }
    return ServiceProcess("edge_agent", env, "/api/pudu/webhook/health", port,
                          tmp / f"edge-{gateway}.log", admin_port=admin_port)


def callback_server(tmp: Path, mqtt_url: str, database_url: str, *, name: str = "cs1",
                    **extra: str) -> ServiceProcess:
    port = free_port()
    env = {
        "MQTT_URL": mqtt_url,
        "DATABASE_URL": database_url,
        "CALLBACK_HTTP_HOST": "127.0.0.1",
        "CALLBACK_HTTP_PORT": str(port),
        "MQTT_CLIENT_ID": f"cs-{name}-{os.getpid()}-{port}",
        "MQTT_RECONNECT_MAX_SECONDS": "1",
        "LOG_LEVEL": "INFO",
        # An all-org admin key, so tests can read the API (``ServiceProcess.auth``).
        "PROXY_TOKEN": ADMIN_TOKEN,
        **extra,
    }
    return ServiceProcess("callback_server", env, "/callback/health", port,
                          tmp / f"callback-{name}.log")
