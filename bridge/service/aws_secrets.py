"""AWS Secrets Manager, as the replaced systems keep their logins there (boto3, optional).

A secret is a JSON object. A database secret is RDS-shaped (``username``, ``password``
and optionally ``host``, ``port``, ``dbname``); other secrets name their keys in
docs/settings.md. boto3 finds the credentials (task role, instance profile, env) and the
endpoint (``AWS_ENDPOINT_URL_SECRETS_MANAGER``) the standard way; it is the ``aws``
extra: ``pip install '.[aws]'``. A secret's value is never logged or shown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import ConfigError

__all__ = ["DbLogin", "RefreshingLogin", "SecretRef", "db_login", "fetch_secret"]

#: A refused login fetches the secret again at most this often (Secrets Manager bills per
#: call and throttles; a wrong password in the secret must not become a request storm).
REFRESH_SECONDS = 30.0


@dataclass(frozen=True)
class SecretRef:
    """Which secret, in which region (None: boto3's default, ``AWS_REGION``)."""

    name: str
    region: str | None = None

    def __str__(self) -> str:
        return f"secret {self.name!r}" + (f" in {self.region}" if self.region else "")


@dataclass(frozen=True)
class DbLogin:
    """What a database secret holds; ``password`` never in a repr."""

    user: str
    password: str = field(repr=False)
    host: str | None = None
    port: int | None = None
    database: str | None = None


def fetch_secret(ref: SecretRef) -> dict[str, Any]:
    """The secret's JSON object; ConfigError naming the secret (never its value)."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ConfigError(f"{ref} needs boto3: pip install 'pudu-fleet-bridge[aws]'") from None
    # botocore logs whole response bodies at DEBUG: the secret's value, with LOG_LEVEL=DEBUG.
    for name in ("botocore", "boto3", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        client = boto3.session.Session().client(
            "secretsmanager", region_name=ref.region,
            config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
        answer = client.get_secret_value(SecretId=ref.name)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise ConfigError(f"{ref}: Secrets Manager answered {code}") from None
    except BotoCoreError as exc:  # no region, no credentials, endpoint unreachable
        raise ConfigError(f"{ref}: {exc}") from None
    text = answer.get("SecretString")
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        # `from None` everywhere: a parse error's message could quote the secret
        raise ConfigError(f"{ref} does not hold a JSON object (SecretString)")
    return value


def db_login(ref: SecretRef, value: dict[str, Any]) -> DbLogin:
    """The RDS-shaped login in ``value``; ConfigError naming a missing key."""
    user, password = value.get("username"), value.get("password")
    if not isinstance(user, str) or not user or not isinstance(password, str):
        raise ConfigError(f"{ref} needs string keys 'username' and 'password'")
    port = value.get("port")
    try:
        port_number = int(port) if port not in (None, "") else None
    except (TypeError, ValueError):
        raise ConfigError(f"{ref}: 'port' is not a number") from None
    host, database = value.get("host"), value.get("dbname")
    return DbLogin(user, password, str(host) if host else None, port_number,
                   str(database) if database else None)


class RefreshingLogin:
    """A database login from a secret that rotates: fetched on first use, and again
    after the database refused it (``stale()``), at most once per ``REFRESH_SECONDS``."""

    def __init__(self, ref: SecretRef, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.ref = ref
        self.refresh_seconds = refresh_seconds
        self._login: DbLogin | None = None
        self._refreshed_at = float("-inf")
        self._stale = False
        self._lock = asyncio.Lock()

    def stale(self) -> None:
        """The database refused the login: fetch again when next asked (rate-limited)."""
        self._stale = True

    async def get(self) -> DbLogin:
        """The current login; ConfigError if the secret cannot be read."""
        async with self._lock:
            # The first refusal after a good spell fetches at once; then once per period.
            due = time.monotonic() - self._refreshed_at >= self.refresh_seconds
            if self._login is not None and self._stale and due:
                self._refreshed_at = time.monotonic()
                self._login = None
            if self._login is None:
                value = await asyncio.to_thread(fetch_secret, self.ref)
                self._login, self._stale = db_login(self.ref, value), False
            return self._login
