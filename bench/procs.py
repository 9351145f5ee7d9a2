"""Processes the bench starts (broker, services, baselines), each stopped by its PID.

The bench runs its own Mosquitto on a free port with a config of its own (unbounded
queues, ``$SYS`` every second, persistence only where a scenario restarts the broker),
so a test run on the shared broker neither disturbs nor is disturbed by it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.procs import free_port as free_port  # one run never repeats a port
from tests.support.procs import kill_process, terminate_process

MOSQUITTO = "/usr/sbin/mosquitto"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def http_get(url: str, token: str | None = None) -> bytes:
    """The body of ``url`` (with ``Authorization: Bearer token`` when given)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
        return bytes(resp.read())


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` ... from /proc/<pid>/status, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm"):
            out[key] = int(value.split()[0])
    return out


class Child:
    """A child process stopped by its PID: SIGTERM and a wait, SIGKILL if that fails."""

    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float = 60.0) -> None:
        terminate_process(self.proc, timeout)

    def kill(self) -> None:
        kill_process(self.proc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Broker(Child):
    """A private ``mosquitto -c <own conf>``; ``start()`` after ``stop()`` keeps the port.

    ``stop()`` is a SIGTERM: mosquitto saves its persistence file on it.
    """

    def __init__(self, base: Path, *, persistence: bool = False) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.binary = MOSQUITTO if os.access(MOSQUITTO, os.X_OK) else (
            shutil.which("mosquitto") or MOSQUITTO)
        self.conf = base / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "user root",  # started as root it would switch to 'mosquitto' and lose our dir
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {base}/",
            # Written on SIGTERM only: a periodic save of a 100k-message queue costs CPU.
            "autosave_interval 0",
            "max_queued_messages 0",  # unbounded: the scenarios queue up to 1M on purpose
            "max_inflight_messages 100",
            "sys_interval 1",
            f"log_dest file {base / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Broker:
        with (self.base / "mosquitto.out").open("ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("private mosquitto did not start: " +
                                   (self.base / "mosquitto.out").read_text()[-1000:])
            time.sleep(0.02)  # polling a connect is the readiness event here
        return self


class Service(Child):
    """A child process listening on ``port``; ready on HTTP 200 at ``health_path``, or
    once the port accepts connections when there is no health path."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, *, port: int,
                 env: Mapping[str, str] | None = None, health_path: str | None = None,
                 admin_port: int | None = None, token: str | None = None) -> None:
        self.name = name
        self.token = token  # the bearer its /metrics wants (the callback server's)
        self.admin_port = admin_port  # the edge agent serves /metrics there (issue 9)
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_dir / f"{name}.log"
        self.port = port
        self.health_path = health_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        port = self.admin_port if self.admin_port is not None else self.port
        return f"http://127.0.0.1:{port}/metrics"

    def ready(self) -> bool:
        if self.health_path is not None:
            return http_ok(self.url + self.health_path)
        return port_open(self.port)

    def launch(self) -> Service:
        """Start without waiting (see ``wait_ready``): lets several start side by side."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        return self

    def wait_ready(self, timeout: float = 60.0) -> Service:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.05)  # polling the health endpoint is the readiness event
        self.kill()
        raise TimeoutError(f"{self.name} not ready within {timeout}s: {self.log_tail()}")

    def start(self, timeout: float = 60.0) -> Service:
        return self.launch().wait_ready(timeout)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def python_module(module: str, *args: str) -> list[str]:
    """argv for ``python -m module args`` with this interpreter (the project's venv)."""
    return [sys.executable, "-m", module, *args]


def venv_script(name: str) -> str:
    """A console script installed beside this interpreter (gunicorn, py-spy)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _stat(pid: int, task: str = "") -> list[str]:
    """The fields after ``comm`` in ``/proc/<pid>[/task/<tid>]/stat``."""
    # comm may hold spaces or parentheses: split after the last ')'
    return Path(f"/proc/{pid}{task}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu(fields: list[str]) -> float:
    """User + system seconds from ``_stat``'s fields."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU of each thread of ``pid``, by its name (``comm``; threads of one
    name summed: Python 3.11 names none of its own, a native library's may be)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            used = _cpu(_stat(pid, f"/task/{task.name}"))
        except OSError:
            continue  # a thread that ended meanwhile
        out[name] = out.get(name, 0.0) + used
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and all its descendants (gunicorn's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total = 0.0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            fields = _stat(current)
        except OSError:
            continue
        total += _cpu(fields)
        todo.extend(children.get(current, []))
    return total
