"""What ``check-config`` and ``run`` both check before anything starts: one list of
problems, one line each, so check-config can never pass settings that run refuses.

Settings themselves are validated when they are loaded (pydantic, bridge.service.settings_loader);
these are the checks that need the parts: URLs a backend takes, files a backend needs,
directories that must be writable; and, with ``--connect``, the broker and database.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from bridge.errors import FleetError
from bridge.transport import IN_PROCESS_BACKENDS, MqttSettings, Transport, create_transport

__all__ = ["broker_reachable", "build", "mqtt_transport", "readable_file", "template_values",
           "tls_pair", "writable_file"]

#: Placeholders the shipped config.yaml templates hold until someone edits them: a
#: service never starts with them (every unedited gateway would share one client id).
TEMPLATE_VALUES = {"org_id": "example-org", "gateway_id": "example-gateway"}


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
                        "the demo; a service needs paho, crt or awsiot")
        return None
    mqtt = build(problems, "MQTT_URL", settings)
    if not isinstance(mqtt, MqttSettings):
        return None
    transport = build(problems, "MQTT_BACKEND", lambda: create_transport(backend, mqtt))
    if isinstance(transport, Transport):
        tls_pair(problems, backend, mqtt)
        return transport
    return None


def tls_pair(problems: list[str], backend: str, mqtt: MqttSettings) -> None:
    """The client certificate and key load *together*, as the backend will load them at
    connect: awscrt's TLS context for crt and awsiot (a key that is not the certificate's fails
    ``run`` with "Failed to create tls context" otherwise), Python's ssl for paho."""
    files = mqtt.tls_files
    if not (files.cert_file and files.key_file):
        return
    for setting, path in (("MQTT_CERT_FILE", files.cert_file), ("MQTT_KEY_FILE", files.key_file)):
        if not readable_file(problems, setting, Path(path)):
            return
    try:
        if backend in ("crt", "awsiot"):
            from awscrt import io

            options = io.TlsContextOptions.create_client_with_mtls_from_path(
                files.cert_file, files.key_file)
            io.ClientTlsContext(options)
        else:
            ssl.create_default_context().load_cert_chain(files.cert_file, files.key_file)
    except ImportError:
        return  # the backend itself is missing: MQTT_BACKEND says so
    except (RuntimeError, ssl.SSLError, OSError) as exc:
        problems.append(f"{_key_source(files.key_file)}: the certificate {files.cert_file} "
                        f"and key {files.key_file} do not load together (is it the "
                        f"certificate's key, in PEM?): {exc}")


def _key_source(key_file: str) -> str:
    """Where the client key came from, for the operator to fix it there: the ``mqtt_key``
    credential (a path in ``$CREDENTIALS_DIRECTORY``, bridge.service.settings_loader)
    or MQTT_KEY_FILE (the variable, or ``tls.key_file`` in config.yaml below it)."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and Path(key_file) == Path(directory, "mqtt_key"):
        return "the mqtt_key credential"
    return "MQTT_KEY_FILE"


def readable_file(problems: list[str], setting: str, path: Path) -> bool:
    """``path`` exists and this user can read it (a root-only key file fails here, under
    ``check-config --as-service``, rather than at the service's first connect)."""
    try:
        with path.open("rb"):
            return True
    except FileNotFoundError:
        problems.append(f"{setting}: {path} does not exist")
    except IsADirectoryError:
        problems.append(f"{setting}: {path} is a directory, not a file")
    except OSError as exc:
        problems.append(f"{setting}: {path} is not readable by this user "
                        f"({exc.strerror or exc})")
    return False


def template_values(problems: list[str], values: dict[str, str],
                    config_path: str | None) -> None:
    """Refuse the shipped template's placeholders, naming the line to change."""
    lines = Path(config_path).read_text(encoding="utf-8", errors="replace").splitlines() \
        if config_path and Path(config_path).is_file() else []
    for key, placeholder in TEMPLATE_VALUES.items():
        if values.get(key) != placeholder:
            continue
        where = next((f"{config_path} line {n}: {line.split('#')[0].strip()}"
                      for n, line in enumerate(lines, 1)
                      if line.split("#")[0].strip().startswith(f"{key}:")
                      and placeholder in line), None)
        problems.append(f"{key.upper()}: {placeholder!r} is the template's placeholder; set "
                        f"this site's own value" + (f" ({where})" if where else
                                                    f" ({key.upper()} or {key}: in config.yaml)"))


def writable_file(problems: list[str], setting: str, path: Path) -> None:
    """``path`` can be created or written by this user (its directory too)."""
    try:
        path.exists()
    except PermissionError:  # a directory on the way this user may not enter
        problems.append(f"{setting}: {path} is out of this user's reach (a directory on "
                        "its way is not searchable, or the unit's sandbox hides it)")
        return
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
