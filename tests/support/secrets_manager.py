"""moto's standalone server as AWS Secrets Manager: a real process on a free port, stopped
by PID. Tests point boto3 at it the standard way (``AWS_ENDPOINT_URL_SECRETS_MANAGER``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.procs import free_port, wait_for_port

REGION = "eu-west-1"


class SecretsManagerServer:
    """``python -m moto.server`` on 127.0.0.1; ``env`` is what a client needs to use it."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """boto3's settings for this server and nothing else (no ~/.aws, no IMDS)."""
        return {
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> SecretsManagerServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
                cwd=self.log_path.parent)  # it writes moto.pid where it runs
        try:
            wait_for_port("127.0.0.1", self.port, timeout=30)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def client(self) -> Any:
        import boto3

        return boto3.client("secretsmanager", region_name=REGION, endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def put(self, name: str, value: dict[str, Any]) -> None:
        """Create the secret, or store a new version of it (a rotation)."""
        client = self.client()
        text = json.dumps(value)
        try:
            client.create_secret(Name=name, SecretString=text)
        except client.exceptions.ResourceExistsException:
            client.put_secret_value(SecretId=name, SecretString=text)

    def __enter__(self) -> SecretsManagerServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class scratch_mysql_user:
    """A MariaDB user with a random password, owning a scratch database; both dropped
    after. Yields ``(user, password, url without a login)``."""

    def __enter__(self) -> tuple[str, str, str]:
        import pymysql

        self.user = f"u{uuid.uuid4().hex[:10]}"
        self.db = f"t_{uuid.uuid4().hex[:10]}"
        password = uuid.uuid4().hex
        with pymysql.connect(host="127.0.0.1", user="root", password="") as conn:
            cur = conn.cursor()
            cur.execute(f"CREATE DATABASE `{self.db}`")
            cur.execute(f"CREATE USER '{self.user}'@'%%' IDENTIFIED BY %s", (password,))
            cur.execute(f"GRANT ALL ON `{self.db}`.* TO '{self.user}'@'%'")
        return self.user, password, f"mysql://127.0.0.1:3306/{self.db}"

    def __exit__(self, *exc: object) -> None:
        import pymysql

        with pymysql.connect(host="127.0.0.1", user="root", password="") as conn:
            cur = conn.cursor()
            cur.execute(f"DROP USER IF EXISTS '{self.user}'@'%'")
            cur.execute(f"DROP DATABASE IF EXISTS `{self.db}`")
