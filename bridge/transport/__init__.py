"""MQTT transports behind one interface, chosen by name."""

from __future__ import annotations

from collections.abc import Callable

from bridge.errors import ConfigError
from bridge.transport.base import (
    InboundMessage,
    MqttSettings,
    TlsFiles,
    Transport,
    Will,
)

__all__ = [
    "InboundMessage",
    "MqttSettings",
    "TlsFiles",
    "Transport",
    "Will",
    "create_transport",
]


def _paho(settings: MqttSettings) -> Transport:
    from bridge.transport.paho import PahoTransport

    return PahoTransport(settings)


# The AWS IoT backend (awscrt, mTLS) registers here when it lands; the interface in
# base.py is what it implements.
_BACKENDS: dict[str, Callable[[MqttSettings], Transport]] = {"paho": _paho}


def create_transport(backend: str, settings: MqttSettings) -> Transport:
    """Build the transport named ``backend`` (``paho``)."""
    try:
        factory = _BACKENDS[backend]
    except KeyError:
        known = sorted(_BACKENDS)
        raise ConfigError(f"unknown MQTT backend {backend!r}; use one of {known}") from None
    return factory(settings)
