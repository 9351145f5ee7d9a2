"""Edge agent settings: one immutable object built once at startup."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.service.aws_secrets import SecretRef, fetch_secret
from bridge.service.settings_loader import (
    HTTP_ENV_MAP,
    MQTT_ENV_MAP,
    ServiceSettings,
    load_settings,
    parse_pairs,
)
from bridge.service.sources import Alias, Layers, Origin, Source
from edge_agent.forwarding import FORWARDABLE, DropTypes, ForwardChannels, Intervals
from edge_agent.pudu.settings import PuduApiSettings

ENV_MAP = {
    **MQTT_ENV_MAP,
    "MAX_CLOCK_SKEW_SECONDS": "max_clock_skew_seconds",
    **HTTP_ENV_MAP,
    "PUDU_CALLBACK_CODE": "pudu_callback_code",
    "EDGE_HTTP_HOST": "http_host",
    "EDGE_HTTP_PORT": "http_port",
    "EDGE_ADMIN_HOST": "admin_host",
    "EDGE_ADMIN_PORT": "admin_port",
    "ORG_ID": "org_id",
    "GATEWAY_ID": "gateway_id",
    "OUTBOX_PATH": "outbox_path",
    "OUTBOX_MAX_ENTRIES": "outbox_max_entries",
    "PUBLISH_WINDOW": "publish_window",
    "PUBLISH_RATE_LIMIT": "publish_rate_limit",
    "PUBLISH_BYTE_LIMIT": "publish_byte_limit",
    "BATCH_FRAMES": "batch_frames",
    "PUBLISH_ACK_TIMEOUT_SECONDS": "publish_ack_timeout_seconds",
    "MAX_BODY_BYTES": "max_body_bytes",
    "FORWARD_CHANNELS": "forward_channels",
    "DROP_TYPES": "drop_types",
    "MIN_INTERVAL_SECONDS": "min_interval_seconds",
    "PUDU_API_URL": "pudu.api_url",
    "PUDU_API_KEY": "pudu.api_key",
    "PUDU_API_SECRET": "pudu.api_secret",
    "PUDU_SHOP_IDS": "pudu.shop_ids",
    "PUDU_POLL_INTERVAL": "pudu.poll_interval_seconds",
    "PUDU_POLL_SCHEDULE": "pudu.poll_schedule",
    "PUDU_LOOKBACK_HOURS": "pudu.lookback_hours",
    "PUDU_API_TIMEOUT_SECONDS": "pudu.timeout_seconds",
    "PUDU_API_RETRIES": "pudu.max_retries",
    "COMMAND_PLUGINS": "command_plugins",
    "ROBOT_QUIET_SECONDS": "robot_quiet_seconds",
    "COMMAND_PLUGIN_TIMEOUT_SECONDS": "command_plugin_timeout_seconds",
    "FORWARD_TIMEOUT": "forward_timeout",
    "FORWARD_MAX_RETRIES": "forward_max_retries",
}
#: systemd credentials the edge agent reads besides the shared ones
#: (bridge.service.settings_loader).
CREDENTIALS = {"pudu_callback_code": "pudu_callback_code", "pudu_api_secret": "pudu.api_secret"}
#: The replaced webhook receiver's names (docs/settings.md): its listener is our webhook one.
ALIASES = {
    "HOST": Alias("http_host", "EDGE_HTTP_HOST"),
    "PORT": Alias("http_port", "EDGE_HTTP_PORT"),
    # the replaced scheduled pull's name for its schedule
    "SCHEDULE_EXPRESSION": Alias("pudu.poll_schedule", "PUDU_POLL_SCHEDULE"),
}
#: Keys of the secret ``PUDU_SECRET_NAME`` names (AWS Secrets Manager) -> setting.
SECRET_KEYS = {"callback_code": "pudu_callback_code", "api_secret": "pudu.api_secret"}

_SEGMENT = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
#: ``BATCH_FRAMES`` was a flag before "always": pydantic's reading of one.
_FLAG = TypeAdapter(bool)
_COMMAND = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _parse_plugins(value: object) -> object:
    """``COMMAND_PLUGINS="restart_app=site_tools:restart, x=m:f"``: one string to a map."""
    return parse_pairs(value, "name=module:function")


def _plugin_shape(value: dict[str, str]) -> dict[str, str]:
    for name, target in value.items():
        if not _COMMAND.match(name):
            raise ValueError(f"{name!r}: a command name is 1-64 letters, digits, '_.-'")
        if not _TARGET.match(target):
            raise ValueError(f"{name}: {target!r} is not 'module:function'")
    return value


CommandPlugins = Annotated[dict[str, str], BeforeValidator(_parse_plugins),
                           AfterValidator(_plugin_shape)]


class EdgeSettings(ServiceSettings, BaseModel):  # BaseModel named: linters see a model
    """Everything the edge agent needs; see config.example/edge-agent.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pudu_callback_code: SecretStr
    http_port: int = Field(8000, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(8001, ge=0, le=65535)
    org_id: str = "default"
    gateway_id: str = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    outbox_path: Path = Path("data/outbox.db")
    outbox_max_entries: int = Field(1_000_000, ge=1)
    dedup_ttl_seconds: float = Field(3600.0, gt=0)
    publish_window: int = Field(100, ge=1, le=1000)
    # msg/s and bytes/s per connection; unset: AWS IoT Core's 100 and 512 KiB with
    # MQTT_BACKEND=awsiot, unlimited otherwise; 0: unlimited
    publish_rate_limit: float | None = Field(None, ge=0)
    publish_byte_limit: float | None = Field(None, ge=0)
    # Batch frames (bridge/frames.py): off, as an IoT rule on per-device topics would not
    # see batched messages; on: a backlog's drain; always: live bursts too (what waits
    # when the publisher comes round; one message waiting still goes alone)
    batch_frames: Literal["off", "on", "always"] = "off"
    # Connected, publishes in flight, no PUBACK for this long: the publisher is wedged and
    # stops the watchdog's heartbeat (a broker that is away is not wedged).
    publish_ack_timeout_seconds: float = Field(10.0, gt=0)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    heartbeat_seconds: float = Field(60.0, ge=0)
    # What leaves the site (edge_agent/forwarding.py): channels forwarded, callback types
    # answered 200 but never forwarded, and per-channel downsampling of superseded state.
    forward_channels: ForwardChannels = FORWARDABLE
    drop_types: DropTypes = ()
    min_interval_seconds: Intervals = {}
    # The Pudu cloud API: robot commands, scheduled reconciliation and fault backfill.
    pudu: PuduApiSettings = PuduApiSettings()
    # Site commands (edge_agent.plugins): name -> "module:function", besides entry points.
    command_plugins: CommandPlugins = {}
    command_plugin_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    # What is kept in memory per robot is dropped after it has been quiet this long
    # (edge_agent/robot_memory.py); at least an hour, so an hourly poll keeps its robots.
    robot_quiet_seconds: float = Field(86_400.0, gt=0)
    # Every outbound HTTP delivery (the REST proxy's callback_url pushes): seconds per
    # attempt and retries after the first, as on the callback server; the defaults are the
    # delivery's own (bridge.proxy.RetryPolicy). What goes to the broker is not a delivery:
    # the outbox retries it until acknowledged.
    forward_timeout: float = Field(10.0, gt=0, le=300)
    forward_max_retries: int = Field(5, ge=0, le=19)

    def publish_limits(self) -> tuple[float, float]:
        """(publishes/s, bytes/s) per connection, 0 meaning unlimited; AWS IoT Core's
        limits by default on the awsiot backend, so a drain never trips its throttling."""
        aws = self.mqtt_backend == "awsiot"
        rate = self.publish_rate_limit
        size = self.publish_byte_limit
        return (rate if rate is not None else (100.0 if aws else 0.0),
                size if size is not None else (512 * 1024.0 if aws else 0.0))

    @field_validator("pudu_callback_code")
    @classmethod
    def _code_shape(cls, v: SecretStr) -> SecretStr:
        # Pudu issues 32 chars, integrators may choose up to 64 letters and digits.
        if not v.get_secret_value().strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("batch_frames", mode="before")
    @classmethod
    def _frames_flag(cls, v: object) -> object:
        # Before "always" this was a flag: its spellings still mean off and on.
        if isinstance(v, str):
            v = v.strip().lower()
        if v in ("off", "on", "always"):
            return v
        try:
            return "on" if _FLAG.validate_python(v) else "off"
        except ValidationError:
            return v  # refused below, naming the three values

    @field_validator("org_id", "gateway_id")
    @classmethod
    def _segment(cls, v: str) -> str:
        if not _SEGMENT.match(v):
            raise ValueError("must be 1-128 of letters, digits, '_', '-', '.', ':'")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> EdgeSettings:
        if not self.mqtt_client_id:
            object.__setattr__(self, "mqtt_client_id", f"edge-{self.org_id}-{self.gateway_id}")
        return self


def _secret(layers: Layers, env: Mapping[str, str]) -> None:
    """``PUDU_SECRET_NAME``: the callback code and API secret kept in Secrets Manager."""
    name = env.get("PUDU_SECRET_NAME")
    if not name:
        return
    ref = SecretRef(name, env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None)
    value = fetch_secret(ref)
    found = False
    for key, dotted in SECRET_KEYS.items():
        if isinstance(value.get(key), str) and value[key]:
            layers.put(dotted, value[key], Origin(Source.SECRET, f"{ref} key {key!r}"))
            found = True
    if not found:
        layers.warnings.append(f"PUDU_SECRET_NAME: {ref} has none of the keys "
                               f"{', '.join(SECRET_KEYS)}")


def load(path: str | None, environ: Mapping[str, str] | None = None) -> EdgeSettings:
    """Read ``path`` (or ``EDGE_AGENT_CONFIG``) and the environment; ConfigError if invalid."""
    env = os.environ if environ is None else environ
    return load_settings(
        EdgeSettings, path=path or env.get("EDGE_AGENT_CONFIG"), env_map=ENV_MAP, environ=env,
        credentials=CREDENTIALS, aliases=ALIASES, secrets=_secret,
        ignored={"CALLBACK_HOST": "the callback server's listener; the edge agent's REST "
                                  "proxy listens on EDGE_ADMIN_HOST/EDGE_ADMIN_PORT",
                 "CALLBACK_PORT": "the callback server's listener; the edge agent's REST "
                                  "proxy listens on EDGE_ADMIN_HOST/EDGE_ADMIN_PORT"},
    )
