"""A private Mosquitto on a free port with its own config, stopped by PID."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.services import pick_port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once ``host:port`` accepts TCP connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)  # polling the port is the readiness event here
    raise TimeoutError(f"{host}:{port} did not open within {timeout}s")


class MosquittoProcess:
    """``mosquitto -c <own conf>``; ``start()`` again after ``stop()`` reuses the port."""

    def __init__(self, base: Path, *, persistence: bool = True, extra: str = "") -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = pick_port()
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.conf = base / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "user root",  # as root mosquitto would switch to 'mosquitto' and lose our tmp dir
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {base}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            f"log_dest file {base / 'mosquitto.log'}",
            extra,
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> MosquittoProcess:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            self.kill()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
