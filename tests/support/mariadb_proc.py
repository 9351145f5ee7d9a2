"""A private MariaDB server on a free port with its own datadir, stopped by PID.

For tests that stop and start the database under load without touching the shared
server on 3306.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import pymysql

from tests.support.procs import free_port
from tests.support.waiting import eventually


class MariadbProcess:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.datadir = base / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        self.cmd = [
            mariadbd, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
            "--bind-address=127.0.0.1", f"--socket={base / 'mysqld.sock'}",
            f"--pid-file={base / 'mysqld.pid'}", "--user=root", "--skip-log-bin",
            "--innodb-buffer-pool-size=32M", "--skip-name-resolve",
        ]

    @property
    def url(self) -> str:
        return f"mysql://root:@127.0.0.1:{self.port}/test"

    def start(self, timeout: float = 30.0) -> MariadbProcess:
        if not self.datadir.exists():
            subprocess.run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}",
                 "--auth-root-authentication-method=normal", "--skip-test-db", "--user=root"],
                check=True, capture_output=True, timeout=120,
            )
        with (self.base / "mariadbd.log").open("ab") as log:  # the child keeps its own
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log)
        proc = self.proc

        def connect() -> pymysql.Connection[Any]:  # a login is the server's readiness event
            if proc.poll() is not None:
                raise RuntimeError((self.base / "mariadbd.log").read_text()[-2000:])
            return pymysql.connect(host="127.0.0.1", port=self.port, user="root",
                                   connect_timeout=1)

        with eventually(connect, within=timeout, what="private mariadbd accepting logins",
                        ignoring=(pymysql.err.OperationalError,)) as conn:
            conn.cursor().execute("CREATE DATABASE IF NOT EXISTS test")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> MariadbProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
