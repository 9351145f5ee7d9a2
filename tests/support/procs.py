"""Real processes for integration tests: a private Mosquitto on a free port, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.support.waiting import NotYet, eventually

MOSQUITTO = "/usr/sbin/mosquitto"


#: Ports already handed out in this run. The kernel may give the same free port to two
#: binds in a row (it did: an edge agent got one port for its HTTP and admin listeners),
#: and a port handed out is not bound until the process it is meant for starts.
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that no earlier call
    in this run returned."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(host: str, port: int) -> bool:
    """Whether ``host:port`` accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def terminate_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM by PID and wait up to ``timeout``; then SIGKILL if it is still there."""
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_process(proc)


def kill_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL by PID and wait: a crash."""
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once ``host:port`` accepts TCP connections; ``TimeoutError`` after ``timeout``.
    Polling a connect is the readiness event here."""
    eventually(lambda: port_open(host, port), within=timeout, what=f"{host}:{port} open")


class MosquittoProcess:
    """``mosquitto -c <own conf>`` on a free port; ``start()`` after ``stop()`` reuses the port.

    ``extra`` lines go at the end of the config (e.g. ``cafile``/``certfile``/``keyfile``
    and ``require_certificate true`` for TLS). With ``persistence`` the broker keeps
    sessions, queued QoS 1 messages and retained ones across a ``stop()``/``start()``
    (mosquitto writes its database on SIGTERM and, here, every second otherwise).
    """

    def __init__(self, base: Path | None = None, *, persistence: bool = True,
                 extra: str | Sequence[str] = (), port: int | None = None) -> None:
        self._own_dir = base is None
        self.base = Path(tempfile.mkdtemp(prefix="mosquitto-")) if base is None else base
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.binary = MOSQUITTO if os.access(MOSQUITTO, os.X_OK) else (
            shutil.which("mosquitto") or MOSQUITTO)
        self.conf = self.base / "mosquitto.conf"
        self.log_path = self.base / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # started as root, mosquitto would drop to user 'mosquitto' and lose our files
            "user root",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.base}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            f"log_dest file {self.log_path}",
            "log_type all",
        ]
        lines += [extra] if isinstance(extra, str) else list(extra)
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start (again, on the same port) and return once the port accepts connections."""
        if self.running:
            raise RuntimeError(f"mosquitto already runs as PID {self.pid}")
        with (self.base / "mosquitto.out").open("ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                         stdout=out, stderr=subprocess.STDOUT)
        proc = self.proc

        def listening() -> bool:  # polling a connect is the readiness event here
            if proc.poll() is not None:
                out_text = (self.base / "mosquitto.out").read_text(errors="replace")
                raise RuntimeError(f"mosquitto exited with {proc.returncode}: "
                                   f"{out_text[-1000:]}{self.log_tail()}")
            return port_open("127.0.0.1", self.port)

        try:
            eventually(listening, within=timeout, what=f"mosquitto listening on {self.port}")
        except NotYet as exc:
            self.kill()
            raise NotYet(f"{exc}: {self.log_tail()}") from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID and wait: mosquitto saves its persistence file and exits."""
        terminate_process(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL by PID and wait: a crash; nothing since the last autosave is kept."""
        kill_process(self.proc)

    def close(self) -> None:
        """Stop, and remove the directory if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
