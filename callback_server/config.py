"""Callback server settings: one immutable object built once at startup."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from bridge.config import (
    HTTP_ENV_MAP,
    MQTT_ENV_MAP,
    HttpLimits,
    OutboundAllow,
    TlsSettings,
    load_settings,
)

ENV_MAP = {
    **MQTT_ENV_MAP,
    "MAX_CLOCK_SKEW_SECONDS": "max_clock_skew_seconds",
    "STALL_SECONDS": "stall_seconds",
    **HTTP_ENV_MAP,
    "DATABASE_URL": "database_url",
    "DATABASE_PASSWORD": "database_password",
    "DATABASE_CONFIG": "database_config",
    "CALLBACK_HTTP_HOST": "http_host",
    "CALLBACK_HTTP_PORT": "http_port",
    "CALLBACK_TOKEN": "callback_token",
    "API_KEYS_FILE": "api_keys_file",
    "SHARE_GROUP": "share_group",
    "COMMAND_TIMEOUT_MAX": "command_timeout_max",
    "LOG_RETENTION_DAYS": "log_retention_days",
    "DEAD_LETTER_RETENTION_DAYS": "dead_letter_retention_days",
    "COMMAND_RETENTION_DAYS": "command_retention_days",
    "HISTORY_RETENTION_DAYS": "history_retention_days",
    "RETENTION_INTERVAL_SECONDS": "retention_interval_seconds",
    "ALERT_RULES_FILE": "alert_rules_file",
    "FORWARD_TIMEOUT": "forward_timeout",
    "FORWARD_MAX_RETRIES": "forward_max_retries",
}


#: systemd credentials the callback server reads besides the shared ones (bridge.config).
CREDENTIALS = {"callback_token": "callback_token", "database_password": "database_password"}


class CallbackSettings(BaseModel):
    """Everything the callback server needs; see config.example/callback-server.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_backend: Literal["paho", "awsiot", "memory"] = "paho"  # memory: tests, demo
    # Stable across restarts so the broker finds our persistent session (and what it
    # held in flight for us) again.
    mqtt_client_id: str = ""
    tls: TlsSettings = TlsSettings()
    database_url: str = "sqlite:///data/callback.db"
    # Fills in the password of database_url, so the URL itself can live in the config file
    # and the password in the environment or a systemd credential.
    database_password: SecretStr | None = None
    database_config: str | None = None
    http_host: str = "0.0.0.0"
    http_port: int = Field(3005, ge=0, le=65535)
    callback_token: SecretStr | None = None
    # Org-scoped, role-bearing API keys (callback_server/keys.py); reloaded on SIGHUP.
    api_keys_file: str | None = None
    share_group: str | None = None
    mqtt_reconnect_max_seconds: float = Field(30.0, gt=0)
    topic_prefix: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    batch_max: int = Field(500, ge=1, le=10_000)
    proxy_token: SecretStr | None = None
    # Topic prefixes the REST proxy may publish/subscribe under; empty: {prefix}org/.
    proxy_allowed_prefixes: list[str] = []
    command_timeout_max: float = Field(60.0, gt=0)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # Days to keep rows of mqtt_message_log / mqtt_dead_letters / device_commands;
    # 0 keeps them forever. Robots and events are never pruned.
    log_retention_days: float = Field(30.0, ge=0)
    dead_letter_retention_days: float = Field(90.0, ge=0)
    command_retention_days: float = Field(90.0, ge=0)
    # Days to keep robot_history and robot_tasks (the console's chart, tracks, tasks); 0: forever.
    history_retention_days: float = Field(7.0, ge=0)
    retention_interval_seconds: float = Field(3600.0, gt=0)
    # A robot time further ahead of this service's clock is not used for ordering.
    max_clock_skew_seconds: float = Field(300.0, gt=0)
    # Health is degraded when a message waits unacked (or nothing commits) this long.
    stall_seconds: float = Field(30.0, gt=0)
    # Outbound webhooks (callback_url) may go here although not globally routable.
    callback_url_allow: OutboundAllow = ()
    # YAML overriding the alert rules' defaults (callback_server/alerts/rules.py).
    alert_rules_file: str | None = None
    # Every outbound delivery (alert webhooks, callback_url): seconds per attempt and retries
    # after the first; unset keeps each one's default (10 s, 5 retries).
    forward_timeout: float | None = Field(None, gt=0, le=300)
    forward_max_retries: int | None = Field(None, ge=0, le=19)
    http_limits: HttpLimits = HttpLimits()

    @field_validator("history_retention_days")
    @classmethod
    def _history_covers_the_chart(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("must be 0 (keep forever) or at least 1: the console's chart "
                             "shows the last 24 h")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("share_group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        if v and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("must be 1-64 of letters, digits, '_', '-', '.'")
        return v or None

    @model_validator(mode="after")
    def _defaults(self) -> CallbackSettings:
        if not self.mqtt_client_id:
            host = socket.gethostname().split(".")[0]
            object.__setattr__(self, "mqtt_client_id", f"callback-server-{host}")
        if self.database_password is not None:
            object.__setattr__(self, "database_url", with_password(
                self.database_url, self.database_password.get_secret_value()))
        return self


def with_password(url: str, password: str) -> str:
    """``scheme://user@host/db`` with ``password`` set (percent-encoded) for ``user``."""
    parts = urlsplit(url)
    if parts.scheme.startswith("sqlite") or not parts.hostname:
        raise ValueError("database_password needs a mysql://user@host/db database_url")
    user = parts.username or "root"
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def load(path: str | None, environ: Mapping[str, str] | None = None) -> CallbackSettings:
    """Read ``path`` (or ``CALLBACK_SERVER_CONFIG``) and the environment."""
    env = os.environ if environ is None else environ
    return load_settings(
        CallbackSettings,
        path=path or env.get("CALLBACK_SERVER_CONFIG"),
        env_map=ENV_MAP,
        environ=env,
        credentials=CREDENTIALS,
    )
