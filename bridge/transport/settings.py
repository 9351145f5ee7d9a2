"""How to reach an MQTT broker and what session to hold there, parsed from a URL."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import ConfigDict, field_validator, model_validator
from pydantic.dataclasses import dataclass as validated

from bridge.errors import ConfigError

__all__ = ["MqttSettings", "TlsFiles", "Will"]


@dataclass(frozen=True, slots=True)
class Will:
    """A message the broker publishes for us (last will) or we publish on connect (birth)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@validated(frozen=True, config=ConfigDict(extra="forbid"))
class TlsFiles:
    """Files for TLS / mutual TLS (AWS IoT needs all three): the transport's argument
    and both services' ``tls`` setting (MQTT_CA_FILE, ...) alike, checked when built."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        # Checked at load, so check-config and start-up name the file, not a TLS error later.
        if value and not os.access(value, os.R_OK):
            raise ValueError(f"{value} does not exist or is not readable")
        return value or None

    @model_validator(mode="after")
    def _pair(self) -> TlsFiles:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return self


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How to reach the broker and what session to hold there."""

    host: str
    port: int
    client_id: str
    tls: bool = False
    tls_files: TlsFiles = field(default_factory=TlsFiles)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: Literal[5, 4] = 5  # 4 = MQTT 3.1.1 (e.g. the embedded amqtt broker)
    keepalive: int = 30
    clean_start: bool = False  # persistent session: QoS 1 traffic queues while we are away
    session_expiry: int = 7 * 24 * 3600
    manual_ack: bool = False
    # MQTT 5 Receive Maximum: how many unacked QoS 1 messages the broker may push to us.
    # With manual acks held until a database commit this bounds the batch size.
    receive_maximum: int = 1000
    max_inflight: int = 100  # AWS IoT's cap on unacked QoS 1; larger is slower in paho
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    will: Will | None = None
    birth: Will | None = None
    offline: Will | None = None  # published on a graceful stop, since the will is not

    @classmethod
    def from_url(cls, url: str, *, client_id: str, **overrides: object) -> MqttSettings:
        """Build from ``mqtt://[user:pass@]host[:port][?protocol=3.1.1]`` or ``mqtts://``."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"MQTT URL must start with mqtt:// or mqtts://, got {url!r}")
        if not parts.hostname:
            raise ConfigError(f"MQTT URL has no host: {url!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"MQTT URL has a bad port: {url!r}") from exc
        query = parse_qs(parts.query)
        protocol: Literal[5, 4] = 5
        if query.get("protocol", ["5"])[0] in ("3.1.1", "311", "4"):
            protocol = 4
        kwargs: dict[str, object] = {
            "host": parts.hostname,
            "port": port,
            "client_id": client_id,
            "tls": tls,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "protocol": protocol,
        }
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]
