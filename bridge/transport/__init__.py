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
    "IN_PROCESS_BACKENDS",
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


def _needs_awscrt(backend: str, exc: ImportError) -> ConfigError:
    return ConfigError(f"the {backend} backend needs the awsiot extra (pip install "
                       f"'pudu-fleet-bridge[awsiot]'): {exc}")


def _crt(settings: MqttSettings) -> Transport:
    try:
        from bridge.transport.crt import CrtTransport
    except ImportError as exc:  # the awsiot extra (awscrt) is not installed
        raise _needs_awscrt("crt", exc) from exc

    return CrtTransport(settings)


def _awsiot(settings: MqttSettings) -> Transport:
    try:
        from bridge.transport.awsiot import AwsIotTransport
    except ImportError as exc:
        raise _needs_awscrt("awsiot", exc) from exc

    return AwsIotTransport(settings)


def _memory(settings: MqttSettings) -> Transport:
    from bridge.transport.memory import MemoryTransport

    return MemoryTransport(settings)


# Imported on use: a gateway on paho never loads awscrt (and the reverse).
_BACKENDS: dict[str, Callable[[MqttSettings], Transport]] = {
    "paho": _paho, "crt": _crt, "awsiot": _awsiot, "memory": _memory,
}
#: For tests and the demo only: ``run`` refuses it (nothing survives the process).
IN_PROCESS_BACKENDS = frozenset({"memory"})


def create_transport(backend: str, settings: MqttSettings) -> Transport:
    """Build the transport named ``backend`` (``paho``, ``crt``, ``awsiot``; ``memory``
    for tests)."""
    try:
        factory = _BACKENDS[backend]
    except KeyError:
        known = sorted(_BACKENDS)
        raise ConfigError(f"unknown MQTT backend {backend!r}; use one of {known}") from None
    return factory(settings)
