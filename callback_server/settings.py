"""Callback server settings: one immutable object built once at startup."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from bridge.errors import ConfigError
from bridge.service.settings_loader import (
    HTTP_ENV_MAP,
    MQTT_ENV_MAP,
    ServiceSettings,
    load_settings,
    read_yaml,
)
from bridge.service.sources import Alias, Layers, Origin, Source, pop_dotted

ENV_MAP = {
    **MQTT_ENV_MAP,
    "MAX_CLOCK_SKEW_SECONDS": "max_clock_skew_seconds",
    "STALL_SECONDS": "stall_seconds",
    **HTTP_ENV_MAP,
    "DATABASE_URL": "database_url",
    "DATABASE_PASSWORD": "database_password",
    "DATABASE_CONFIG": "database_config",
    "DATABASE_SECRET_NAME": "database.secret_name",
    "AWS_REGION": "database.region_name",
    "CREDENTIALS_FILE": "credentials_file",
    "CALLBACK_HTTP_HOST": "http_host",
    "CALLBACK_HTTP_PORT": "http_port",
    "CALLBACK_HTTP_REUSE_PORT": "http_reuse_port",
    "CALLBACK_REPLICA": "replica",
    "CALLBACK_TOKEN": "callback_token",
    "API_KEYS_FILE": "api_keys_file",
    "SHARE_GROUP": "share_group",
    "COMMAND_TIMEOUT_MAX": "command_timeout_max",
    "LOG_RETENTION_DAYS": "log_retention_days",
    "DEAD_LETTER_RETENTION_DAYS": "dead_letter_retention_days",
    "COMMAND_RETENTION_DAYS": "command_retention_days",
    "HISTORY_RETENTION_DAYS": "history_retention_days",
    "WEBHOOK_DELIVERY_RETENTION_DAYS": "webhook_delivery_retention_days",
    "RETENTION_INTERVAL_SECONDS": "retention_interval_seconds",
    "ALERT_RULES_FILE": "alert_rules_file",
    "INGEST_PENDING_MAX": "ingest_pending_max",
    "CALLBACK_CODES": "callback_codes",
    "CALLBACK_CODES_FILE": "callback_codes_file",
    "FORWARD_TIMEOUT": "forward_timeout",
    "FORWARD_MAX_RETRIES": "forward_max_retries",
}


#: systemd credentials the callback server reads besides the shared ones
#: (bridge.service.settings_loader).
CREDENTIALS = {"callback_token": "callback_token", "database_password": "database_password",
               "callback_codes": "callback_codes"}

#: The replaced systems' names (docs/settings.md): the MQTT proxy's callback listener, the
#: scheduled pulls' database parts and secret name.
ALIASES = {
    "CALLBACK_HOST": Alias("http_host", "CALLBACK_HTTP_HOST"),
    "CALLBACK_PORT": Alias("http_port", "CALLBACK_HTTP_PORT"),
    "DB_HOST": Alias("database.host", "DATABASE_URL"),
    "DB_PORT": Alias("database.port", "DATABASE_URL"),
    "DB_NAME": Alias("database.name", "DATABASE_URL"),
    "DB_USER": Alias("database.user", "DATABASE_URL"),
    "DB_PASSWORD": Alias("database_password", "DATABASE_PASSWORD"),
    "SECRETS_MANAGER_SECRET_NAME": Alias("database.secret_name", "DATABASE_SECRET_NAME"),
}
#: Seed names the callback server does not take, and what it takes instead.
IGNORED = {
    "SCHEDULE_EXPRESSION": "the Pudu cloud poll runs on the edge agent: set it there "
                           "(an alias of its PUDU_POLL_SCHEDULE)",
    "HOST": "the replaced receiver's listener; the callback server listens on "
            "CALLBACK_HTTP_HOST (or CALLBACK_HOST)",
    "PORT": "the replaced receiver's listener; the callback server listens on "
            "CALLBACK_HTTP_PORT (or CALLBACK_PORT)",
}
#: DATABASE_URL's parts a seed gives one by one (DB_HOST, ... or credentials.yaml).
_PARTS = ("host", "port", "name", "user")


class DatabaseSource(BaseModel):
    """Where the database login lives when it is not in DATABASE_URL: an AWS Secrets
    Manager secret (RDS-shaped JSON), read by the MySQL backend and again on rotation."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    secret_name: str | None = None
    region_name: str | None = None


class CallbackSettings(ServiceSettings, BaseModel):  # BaseModel named: linters see a model
    """Everything the callback server needs; see config.example/callback-server.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    database_url: str = "sqlite:///data/callback.db"
    # Fills in the password of database_url, so the URL itself can live in the config file
    # and the password in the environment or a systemd credential.
    database_password: SecretStr | None = None
    database_config: str | None = None
    # The seed's credentials.yaml (database: {host, secret_name, region_name}).
    credentials_file: str | None = None
    database: DatabaseSource = DatabaseSource()
    http_port: int = Field(3005, ge=0, le=65535)
    # Replicas on one host share http_port (each sets it; the kernel spreads connections).
    http_reuse_port: bool = False
    # This replica's name among several on one host (the systemd template's instance,
    # callback-server@2): implies http_reuse_port, suffixes the MQTT client id, and puts
    # the replicas in one share group unless share_group names one.
    replica: str | None = None
    callback_token: SecretStr | None = None
    # Org-scoped, role-bearing API keys (callback_server/keys.py); reloaded on SIGHUP.
    api_keys_file: str | None = None
    share_group: str | None = None
    # Messages per database transaction at most. Each robot's rows are written once per
    # batch, so a batch covering more messages per robot costs less per message (bench
    # consumer, 1,000 robots: 500 -> 2,000 took MariaDB's CPU from 110 to 76 µs a
    # message, two replicas from 6,400 to 10,600 msg/s, measured while batches in flight
    # still shared robots).
    batch_max: int = Field(2000, ge=1, le=10_000)
    command_timeout_max: float = Field(60.0, gt=0)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # Days to keep rows of mqtt_message_log / mqtt_dead_letters / device_commands;
    # 0 keeps them forever. Robots and events are never pruned.
    log_retention_days: float = Field(30.0, ge=0)
    dead_letter_retention_days: float = Field(90.0, ge=0)
    command_retention_days: float = Field(90.0, ge=0)
    # Days to keep robot_history and robot_tasks (the console's chart, tracks, tasks); 0: forever.
    history_retention_days: float = Field(7.0, ge=0)
    # Days to keep webhook_deliveries (every attempt of event webhooks and alert
    # subscriptions: their delivery logs); 0: forever.
    webhook_delivery_retention_days: float = Field(30.0, ge=0)
    retention_interval_seconds: float = Field(3600.0, gt=0)
    # Health is degraded when a message waits unacked (or nothing commits) this long.
    stall_seconds: float = Field(30.0, gt=0)
    # YAML overriding the alert rules' defaults (callback_server/alerts/rules.py).
    alert_rules_file: str | None = None
    # Every outbound delivery (alert webhooks, callback_url): seconds per attempt and retries
    # after the first; unset keeps each one's default (10 s, 5 retries).
    forward_timeout: float | None = Field(None, gt=0, le=300)
    forward_max_retries: int | None = Field(None, ge=0, le=19)
    # HTTP ingest messages held at most while the database does not commit (503 beyond).
    ingest_pending_max: int = Field(10_000, ge=1)
    # Pudu callback codes -> org for POST /api/pudu/webhook (callback_server/pudu_webhook.py):
    # "code1=orgA,code2=orgB", and/or a YAML file mapping code -> org.
    callback_codes: SecretStr | None = None
    callback_codes_file: str | None = None

    @field_validator("history_retention_days")
    @classmethod
    def _history_covers_the_chart(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("must be 0 (keep forever) or at least 1: the console's chart "
                             "shows the last 24 h")
        return value

    @field_validator("share_group", "replica")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        if v and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("must be 1-64 of letters, digits, '_', '-', '.'")
        return v or None

    @model_validator(mode="after")
    def _defaults(self) -> CallbackSettings:
        if self.replica:
            object.__setattr__(self, "http_reuse_port", True)
            if not self.share_group:
                object.__setattr__(self, "share_group", "callback-server")
        if self.http_reuse_port and not self.mqtt_client_id and not self.replica \
                and self.mqtt_backend != "memory":
            # the default id names the host: replicas of one host would take each other's
            # broker session, each connect dropping the other
            raise ValueError("http_reuse_port (CALLBACK_HTTP_REUSE_PORT) runs replicas on one "
                             "host: give each its own MQTT_CLIENT_ID, or CALLBACK_REPLICA")
        if not self.mqtt_client_id:
            host = socket.gethostname().split(".")[0]
            object.__setattr__(self, "mqtt_client_id", f"callback-server-{host}")
        if self.replica:
            object.__setattr__(self, "mqtt_client_id", f"{self.mqtt_client_id}-{self.replica}")
        secret = self.database.secret_name
        if self.database_password is not None:
            object.__setattr__(self, "database_url", with_password(
                self.database_url, self.database_password.get_secret_value(), bool(secret)))
        if secret:
            object.__setattr__(self, "database_url", with_secret(
                self.database_url, secret, self.database.region_name))
        return self


def with_password(url: str, password: str, secret: bool = False) -> str:
    """``scheme://user@host/db`` with ``password`` set (percent-encoded) for ``user``;
    without a user only when a secret gives it (``secret``)."""
    parts = urlsplit(url)
    if parts.scheme.startswith("sqlite") or not (parts.hostname or secret):
        raise ValueError("database_password needs a mysql://user@host/db database_url")
    if not parts.username and not secret:
        raise ValueError("database_password needs a user in database_url "
                         "(mysql://user@host/db, or DB_USER)")
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def with_secret(url: str, name: str, region: str | None) -> str:
    """The URL naming the secret the MySQL backend reads its login from (never the login)."""
    parts = urlsplit(url)
    if not parts.scheme.startswith(("mysql", "mariadb")):
        raise ValueError(f"database.secret_name ({name!r}) needs a mysql:// database_url "
                         "(or DB_HOST), not the SQLite default")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("secret_name", "region_name")]
    query.append(("secret_name", name))
    if region:
        query.append(("region_name", region))
    # by hand: urlunsplit drops the "//" of an empty host (mysql:///?secret_name=...)
    return f"{parts.scheme}://{parts.netloc}{parts.path or '/'}?{urlencode(query)}"


def _credentials_file(layers: Layers, env: Mapping[str, str]) -> None:
    """``CREDENTIALS_FILE``: the seed's credentials.yaml, at the rank of config files."""
    path = env.get("CREDENTIALS_FILE") or layers.raw.get("credentials_file")
    if not path:
        return
    loaded = read_yaml(path, "credentials file")
    database = loaded.get("database")
    if not isinstance(database, dict):
        raise ConfigError(f"credentials file {path}: expected a 'database:' mapping "
                          "(host, secret_name, region_name)")
    keys = {"host": "host", "port": "port", "dbname": "name", "name": "name",
            "username": "user", "user": "user", "secret_name": "secret_name",
            "region_name": "region_name"}
    unknown = sorted(set(database) - set(keys))
    if unknown:
        raise ConfigError(f"credentials file {path}: database.{unknown[0]} is not a key "
                          f"this service reads ({', '.join(keys)})")
    where = Origin(Source.FILE, Path(path).name)
    for key, value in database.items():
        if value not in (None, ""):
            layers.put(f"database.{keys[key]}", value, where)
    others = sorted(set(loaded) - {"database"})
    if others:
        layers.warnings.append(f"credentials file {path}: only 'database' is read; "
                               f"{', '.join(others)} ignored")


def _compose_database(layers: Layers, env: Mapping[str, str]) -> None:
    """DATABASE_URL from its parts (DB_HOST, ..., credentials.yaml's host), each part from
    the highest source that gives it; the URL itself counts as the source it came from."""
    raw = layers.raw
    given = {k: pop_dotted(raw, f"database.{k}") for k in _PARTS}
    given = {k: str(v) for k, v in given.items() if v not in (None, "")}
    url = str(raw.get("database_url") or "")
    url_origin = layers.origin.get("database_url")
    url_rank = url_origin.source if url_origin else None
    if given:
        raw["database_url"] = _with_parts(layers, url, url_origin, given)
    secret = raw.get("database", {}).get("secret_name") if isinstance(
        raw.get("database"), dict) else None
    if not secret:
        return
    if not raw.get("database_url"):
        raw["database_url"] = "mysql:///"  # where to connect: all from the secret
    # The secret ranks above the files: a login (user, password) only a file gives is not
    # used; a host, port or database named anywhere stays where to connect (the seed's
    # credentials.yaml host beside its secret), and the secret fills in what is missing.
    if layers.rank("database_password") == Source.FILE:
        pop_dotted(raw, "database_password")
        layers.notes.append("database_password from the config file is not used: the "
                            "Secrets Manager secret ranks higher")
    parts = urlsplit(str(raw.get("database_url") or ""))
    user_rank = layers.rank("database.user") if given.get("user") else url_rank
    if parts.username and user_rank == Source.FILE:
        layers.notes.append("the user in database_url (config file) is not used: the "
                            "Secrets Manager secret ranks higher")
        raw["database_url"] = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    elif parts.password and url_rank == Source.FILE:
        layers.notes.append("the password in database_url (config file) is not used: the "
                            "Secrets Manager secret ranks higher")
        raw["database_url"] = urlunsplit(parts._replace(
            netloc=f"{parts.netloc.rpartition('@')[0].split(':')[0]}@"
                   f"{parts.netloc.rpartition('@')[2]}"))
    elif parts.password:
        layers.notes.append(f"the password in database_url ({_name(url_origin)}) is used, "
                            "not the secret's: a rotation of the secret does not reach it")
    password_origin = layers.origin.get("database_password")
    if raw.get("database_password") and password_origin is not None:
        layers.notes.append(f"database_password ({password_origin.name}) is used, not the "
                            "secret's: a rotation of the secret does not reach it")


def _name(origin: Origin | None) -> str:
    return origin.name if origin else "the default"


def _with_parts(layers: Layers, url: str, url_origin: Origin | None,
                given: dict[str, str]) -> str:
    parts = urlsplit(url) if url else None
    if parts is None or parts.scheme.startswith("sqlite"):
        if parts is not None and url_origin is not None:
            ranks = [layers.rank(f"database.{k}") or Source.FILE for k in given]
            if url_origin.source >= max(ranks):
                names = ", ".join(layers.origin[f"database.{k}"].name for k in given)
                layers.notes.append(f"database parts from {names} are not used: "
                                    f"database_url ({url_origin.name}) names SQLite")
                return url
            layers.notes.append(f"database_url from {url_origin.name} (SQLite) is "
                                "replaced by the MySQL parts given above it")
        current: dict[str, str] = {}
        scheme, query, password = "mysql", "", ""
    else:
        current = {"host": parts.hostname or "", "port": str(parts.port or ""),
                   "name": unquote(parts.path.lstrip("/")),
                   "user": unquote(parts.username or "")}
        current = {k: v for k, v in current.items() if v}
        scheme, query, password = parts.scheme, parts.query, parts.password or ""
    for key, value in given.items():
        origin = layers.origin[f"database.{key}"]
        if key in current and url_origin is not None and url_origin.source >= origin.source:
            if current[key] != value:
                layers.notes.append(f"database {key}: {origin.name} is not used, "
                                    f"database_url ({url_origin.name}) gives it")
            continue
        if key in current and current[key] != value and url_origin is not None:
            layers.notes.append(f"database {key}: {origin.name} wins over database_url "
                                f"({url_origin.name})")
        current[key] = value
    if not current.get("host"):
        return url  # DB_USER alone: the backend says the URL lacks a host
    login = quote(current.get("user", ""), safe="")
    if password:
        login += ":" + password
    netloc = (login + "@" if login else "") + current["host"]
    if current.get("port"):
        netloc += ":" + current["port"]
    path = "/" + quote(current.get("name", ""), safe="")
    return urlunsplit((scheme, netloc, path, query, ""))


def load(path: str | None, environ: Mapping[str, str] | None = None) -> CallbackSettings:
    """Read ``path`` (or ``CALLBACK_SERVER_CONFIG``) and the environment."""
    env = os.environ if environ is None else environ
    return load_settings(
        CallbackSettings,
        path=path or env.get("CALLBACK_SERVER_CONFIG"),
        env_map=ENV_MAP,
        environ=env,
        credentials=CREDENTIALS,
        aliases=ALIASES,
        ignored=IGNORED,
        files=_credentials_file,
        compose=_compose_database,
    )
