"""What ``check-config`` and ``run`` both check before anything starts: one list of
problems, one line each, so check-config can never pass settings that run refuses.

Settings themselves are validated when they are loaded (pydantic, bridge.config);
these are the checks that need the parts: URLs a backend takes, files a backend needs,
directories that must be writable; and, with ``--connect``, the broker and database.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from bridge.errors import FleetError
from bridge.transport import IN_PROCESS_BACKENDS, MqttSettings, Transport, create_transport

__all__ = ["broker_reachable", "build", "mqtt_transport", "writable_file"]


def build(problems: list[str], what: str, make: Callable[[], object]) -> object | None:
    """``make()``, or None with what it raised added to ``problems`` (one line)."""
    try:
        return make()
    except (FleetError, ValueError, OSError) as exc:  # ConfigError above all
        problems.append(f"{what}: {exc}")
    return None


def mqtt_transport(problems: list[str], backend: str,
                   settings: Callable[[], MqttSettings]) -> Transport | None:
    """The transport the service would start (nothing connects yet), or None."""
    if backend in IN_PROCESS_BACKENDS:
        problems.append(f"MQTT_BACKEND: {backend!r} is an in-process broker for tests and "
                        "the demo; a service needs paho or awsiot")
        return None
    mqtt = build(problems, "MQTT_URL", settings)
    if not isinstance(mqtt, MqttSettings):
        return None
    transport = build(problems, "MQTT_BACKEND", lambda: create_transport(backend, mqtt))
    return transport if isinstance(transport, Transport) else None


def writable_file(problems: list[str], setting: str, path: Path) -> None:
    """``path`` can be created or written by this user (its directory too)."""
    if path.exists():
        if not path.is_file():
            problems.append(f"{setting}: {path} exists and is not a file")
        elif not os.access(path, os.R_OK | os.W_OK):
            problems.append(f"{setting}: {path} is not readable and writable by this user")
        return
    parent = path.parent.resolve()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest directory that exists is where we must write
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        problems.append(f"{setting}: cannot create {path}: {parent} is not writable by this user")
        return
    try:  # os.access says yes to root anywhere, /proc included: try it (nothing is left)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        problems.append(f"{setting}: cannot create {path}: {parent} does not take new "
                        f"files ({exc.strerror or exc})")


async def broker_reachable(problems: list[str], transport: Transport, url: str,
                           seconds: float = 5.0) -> None:
    """Connect once (check-config --connect): the address, TLS and credentials work."""
    try:
        async with transport:
            await asyncio.wait_for(transport.wait_connected(), seconds)
    except TimeoutError:
        problems.append(f"MQTT_URL: no connection to {url} within {seconds:g} s "
                        "(address, TLS files and credentials; the log says more)")
    except FleetError as exc:
        problems.append(f"MQTT_URL: {exc}")
