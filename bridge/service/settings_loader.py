"""Settings loading shared by both services: YAML file, then environment overrides.

Each service declares a pydantic model and a map from environment variable to field;
this module reads the file and the environment once, at startup, in one place.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)

from bridge.clock import MAX_SKEW_SECONDS
from bridge.errors import ConfigError
from bridge.http.outbound import parse_allow
from bridge.service.sources import Alias, Layers, Origin, Source, dotenv_warning, not_honoured
from bridge.service.sources import aliases as apply_aliases
from bridge.transport.settings import MqttSettings, TlsFiles

M = TypeVar("M", bound=BaseModel)
MASK = "********"


#: Environment overrides every service reading MQTT settings understands.
MQTT_ENV_MAP = {
    "MQTT_URL": "mqtt_url",
    "MQTT_BACKEND": "mqtt_backend",
    "MQTT_CLIENT_ID": "mqtt_client_id",
    "MQTT_CA_FILE": "tls.ca_file",
    "MQTT_CERT_FILE": "tls.cert_file",
    "MQTT_KEY_FILE": "tls.key_file",
    "MQTT_RECONNECT_MAX_SECONDS": "mqtt_reconnect_max_seconds",
    "TOPIC_PREFIX": "topic_prefix",
    "LOG_LEVEL": "log_level",
    "LOG_FILE": "log_file",
    "PROXY_TOKEN": "proxy_token",
}


#: Environment overrides for what both services' HTTP side owes to hostile clients.
HTTP_ENV_MAP = {
    "CALLBACK_URL_ALLOW": "callback_url_allow",
    "HTTP_HEADER_TIMEOUT_SECONDS": "http_limits.header_timeout_seconds",
    "HTTP_KEEPALIVE_TIMEOUT_SECONDS": "http_limits.keepalive_timeout_seconds",
    "HTTP_BODY_TIMEOUT_SECONDS": "http_limits.body_timeout_seconds",
    "HTTP_MAX_CONNECTIONS": "http_limits.max_connections",
}


class HttpLimits(BaseModel):
    """What one client may hold of a listener; applied to every listener of a service."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # From accept (or any byte between requests) to the end of the headers.
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    # Idle time allowed between a response and the next request on a kept-alive connection.
    keepalive_timeout_seconds: float = Field(default=5.0, gt=0)
    # From the end of the headers to the end of the body; past it 408 (or a close).
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    # Beyond this many open connections a new one is answered 503 with Retry-After.
    max_connections: int = Field(default=4096, ge=1)


def split_list(text: str) -> list[str]:
    """A settings list as the environment gives it, one string: ``"a, b c"`` (commas
    and/or spaces between items) to ``["a", "b", "c"]``. Every list setting of both
    services is split here (through :func:`as_list` for the settings models)."""
    return text.replace(",", " ").split()


def as_list(value: object) -> object:
    """Before-validator of a list setting: a string is split (:func:`split_list`); a list
    from YAML passes with each item as text (``shop_ids: [123]``)."""
    if isinstance(value, str):
        return split_list(value)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return value


def _valid_allow(value: tuple[str, ...]) -> tuple[str, ...]:
    try:
        parse_allow(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return value


#: ``CALLBACK_URL_ALLOW``: host names and CIDRs outbound calls may go to although they
#: are not globally routable (see bridge/http/outbound.py).
OutboundAllow = Annotated[tuple[str, ...], BeforeValidator(as_list),
                          AfterValidator(_valid_allow)]


#: systemd credentials (``LoadCredential=``) both services read from
#: ``$CREDENTIALS_DIRECTORY``: file name -> setting. The file's content is the value,
#: except for those in ``CREDENTIAL_PATHS``, whose *path* is the value (a key file).
CREDENTIALS = {
    "proxy_token": "proxy_token",
    "mqtt_key": "tls.key_file",
}
CREDENTIAL_PATHS = frozenset({"mqtt_key"})


class Settings(BaseModel):
    """Base of each service's settings: remembers what loading them had to say (which
    source gave what, seed names used or ignored), for check-config and the log."""

    _notes: tuple[str, ...] = PrivateAttr(default=())
    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def source_notes(self) -> tuple[str, ...]:
        """Seed names used, and every setting two sources gave (and which one won)."""
        return self._notes

    @property
    def source_warnings(self) -> tuple[str, ...]:
        """Seed names set but not honoured, a ``.env`` nobody reads."""
        return self._warnings


class ServiceSettings(Settings, BaseModel):  # BaseModel named: linters see a model
    """What both services' settings hold alike: the broker, the log, the REST proxy, the
    robot clock bound and the HTTP side's limits. Each service's model adds its own; a
    setting both share is declared here once, with its default and its check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_backend: Literal["paho", "crt", "awsiot", "memory"] = "paho"  # memory: tests, demo
    # Stable across restarts so the broker finds our persistent session (and what it
    # held in flight for us) again; empty: each service names itself (its _defaults).
    mqtt_client_id: str = ""
    tls: TlsFiles = TlsFiles()
    mqtt_reconnect_max_seconds: float = Field(30.0, gt=0)
    topic_prefix: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # A file the log lines also go to (besides stderr, i.e. the journal): LOG_FILE.
    log_file: str | None = None
    proxy_token: SecretStr | None = None
    # Topic prefixes the REST proxy may publish/subscribe under; empty: the service's own
    # subtree (the edge: org/{org_id}/ only; the callback server: {prefix}org/).
    proxy_allowed_prefixes: list[str] = []
    # A robot time further ahead of this service's clock is not used for ordering.
    max_clock_skew_seconds: float = Field(MAX_SKEW_SECONDS, gt=0)
    # Outbound webhooks (callback_url) may go here although not globally routable.
    callback_url_allow: OutboundAllow = ()
    http_limits: HttpLimits = HttpLimits()
    # The service's main listener (the edge's webhook, the callback server's API); each
    # service names its port and the environment variables for both.
    http_host: str = "0.0.0.0"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    def mqtt_settings(self, **session: Any) -> MqttSettings:
        """The broker session these settings describe (URL, client id, TLS files,
        reconnect bound); ``session``: what the service adds (acks, will, windows)."""
        return MqttSettings.from_url(
            self.mqtt_url, client_id=self.mqtt_client_id,
            backoff_max=self.mqtt_reconnect_max_seconds, tls_files=self.tls, **session)


def read_credentials(names: Mapping[str, str], env: Mapping[str, str]) -> dict[str, Any]:
    """The systemd credentials present, as ``{credential name: value}``.

    systemd passes ``LoadCredential=`` files in a private directory named by
    ``$CREDENTIALS_DIRECTORY``; outside systemd there is none and this is empty.
    """
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return {}
    found: dict[str, Any] = {}
    for name in names:
        path = Path(directory) / name
        # Empty counts as absent: `make install` creates every credential file the units
        # load (systemd refuses to start a unit whose LoadCredential= file is missing).
        if not path.is_file() or path.stat().st_size == 0:
            continue
        if name in CREDENTIAL_PATHS:
            found[name] = str(path)
            continue
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read credential {path}: {exc}") from exc
        if value:
            found[name] = value
    return found


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping; ConfigError naming the file otherwise."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return loaded


#: A hook run on the layers between two sources (extra files, secrets, composition).
Hook = Callable[[Layers, Mapping[str, str]], None]


def load_settings(
    model: type[M],
    *,
    path: str | Path | None,
    env_map: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
    credentials: Mapping[str, str] | None = None,
    aliases: Mapping[str, Alias] | None = None,
    ignored: Mapping[str, str] | None = None,
    files: Hook | None = None,
    secrets: Hook | None = None,
    compose: Hook | None = None,
) -> M:
    """Build ``model`` from its sources, lowest first (bridge/service/sources.py): the YAML at
    ``path`` (and ``files``), ``secrets``, systemd credentials, seed ``aliases``, the
    product's environment names (``env_map``); ``compose`` last, knowing each origin.
    A source only overrides the ones below it. ``ignored``: seed names this service
    does not honour (warned about, besides the shared ones)."""
    env = os.environ if environ is None else environ
    creds = {**CREDENTIALS, **(credentials or {})}
    seed = dict(aliases or {})
    known = {*env_map.values(), *creds.values(), *(a.setting for a in seed.values())}
    layers = Layers()
    if path:
        layers.file(read_yaml(path), Path(path).name, known)
    if files is not None:
        files(layers, env)
    if secrets is not None:
        secrets(layers, env)
    for name, value in read_credentials(creds, env).items():
        layers.put(creds[name], value, Origin(Source.CREDENTIAL, f"the credential {name}"))
    apply_aliases(layers, seed, env)
    for var, dotted in env_map.items():
        if env.get(var):
            layers.put(dotted, env[var], Origin(Source.ENV, var))
    if compose is not None:
        compose(layers, env)
    try:
        settings = model.model_validate(layers.raw)
    except ValidationError as exc:
        env_of = {dotted: var for var, dotted in env_map.items()}
        cred_of = {dotted: name for name, dotted in creds.items()}

        def describe(err: Any) -> str:
            where = ".".join(str(p) for p in err["loc"]) or "config"
            ways = []
            if where in env_of:
                ways.append(f"set {env_of[where]}")
            if where in cred_of:
                ways.append(f"a credential file {cred_of[where]} "
                            f"($CREDENTIALS_DIRECTORY/{cred_of[where]})")
            if ways:
                ways.append(f"'{where}' in the file")
            hint = f" ({', or '.join(ways)})" if ways else ""
            msg = str(err["msg"]).removeprefix("Value error, ")  # pydantic's, not ours
            return f"{where}: {msg}{hint}"

        problems = "; ".join(describe(err) for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from exc
    if isinstance(settings, Settings):
        settings._notes = tuple(layers.notes)
        settings._warnings = (*layers.warnings, *not_honoured(env, ignored or {}),
                              *dotenv_warning())
    return settings


def parse_pairs(value: object, example: str) -> object:
    """``"a=1, b=2"`` (an environment variable) to ``{"a": "1", "b": "2"}``; a mapping
    (from YAML) passes through. ValueError names ``example`` for a part without ``=``."""
    if not isinstance(value, str):
        return value
    out: dict[str, str] = {}
    for part in split_list(value):
        name, sep, rest = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r}: expected {example}")
        out[name.strip()] = rest.strip()
    return out


def masked(settings: BaseModel) -> dict[str, Any]:
    """The settings as plain data with every secret replaced by a mask."""

    def walk(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return MASK if value.get_secret_value() else ""
        if isinstance(value, BaseModel):
            return {k: walk(getattr(value, k)) for k in type(value).model_fields}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: walk(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str) and "://" in value:
            return mask_url(value)  # mqtt://user:pass@host, mysql://user:pass@host
        return value

    return walk(settings)  # type: ignore[no-any-return]


def mask_url(url: str) -> str:
    """``scheme://user:****@host`` — a URL safe to log."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:{MASK}@{host}" if ":" in creds else url
