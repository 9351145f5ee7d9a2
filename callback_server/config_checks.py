"""The callback server's pre-start checks (bridge.service.preflight): ``check-config``
and ``run``."""

from __future__ import annotations

from pathlib import Path

from bridge.service.preflight import (
    broker_reachable,
    build,
    mqtt_transport,
    readable_file,
    writable_file,
)
from bridge.service.settings_loader import mask_url
from callback_server.settings import CallbackSettings
from callback_server.store.protocol import Store


def _store(settings: CallbackSettings) -> Store:
    from callback_server.store import load_targets, open_store

    targets = load_targets(settings.database_config) if settings.database_config else None
    return open_store(settings.database_url, targets=targets)


def gateway_less(settings: CallbackSettings) -> bool:
    """A deployment without gateways (Pudu posts its webhooks here): no broker to reach,
    so the in-process one is a service's choice, not a test's."""
    return settings.mqtt_backend == "memory" and bool(
        settings.callback_codes is not None or settings.callback_codes_file)


def problems(settings: CallbackSettings) -> list[str]:
    """One line per problem; empty when ``run`` would start."""
    from callback_server.service import mqtt_settings

    found: list[str] = []
    if not gateway_less(settings):
        mqtt_transport(found, settings.mqtt_backend, lambda: mqtt_settings(settings))
    build(found, "DATABASE_URL", lambda: _store(settings))
    if settings.callback_codes is not None or settings.callback_codes_file:
        from callback_server.pudu_webhook import CallbackCodes

        build(found, "Pudu webhook", lambda: CallbackCodes.load(settings))
    keys_file(found, settings)
    if settings.alert_rules_file:
        from callback_server.alerts import load_alert_settings

        build(found, "ALERT_RULES_FILE", lambda: load_alert_settings(settings.alert_rules_file))
    url = settings.database_url
    if url.startswith("sqlite:///"):
        writable_file(found, "DATABASE_URL", Path(url.removeprefix("sqlite:///")))
    if settings.log_file:
        writable_file(found, "LOG_FILE", Path(settings.log_file))
    return found


def keys_file(found: list[str], settings: CallbackSettings) -> None:
    """A named API_KEYS_FILE must exist and be readable: a typo would otherwise start the
    server with no keys and no warning (``keys add`` creates the file)."""
    if not settings.api_keys_file:
        return
    from callback_server.keys import read_file

    path = Path(settings.api_keys_file)
    if not path.exists():
        found.append(f"API_KEYS_FILE: {path} does not exist (a typo? `callback-server keys "
                     "add` creates it)")
    elif readable_file(found, "API_KEYS_FILE", path):
        build(found, "API_KEYS_FILE", lambda: read_file(path))


async def connect_problems(settings: CallbackSettings) -> list[str]:
    """``check-config --connect``: the settings' problems, then the broker and database."""
    from callback_server.service import mqtt_settings

    found = problems(settings)
    if found:
        return found
    transport = None if gateway_less(settings) else mqtt_transport(
        found, settings.mqtt_backend, lambda: mqtt_settings(settings))
    if transport is not None:
        await broker_reachable(found, transport, mask_url(settings.mqtt_url))
    async with _store(settings) as store:
        # The store's own words: "the login ... cannot be read from Secrets Manager: ..."
        # sends the operator to the secret, "cannot reach MySQL at ..." to the database.
        why = await store.unreachable()
        if why is not None:
            found.append(f"DATABASE_URL ({mask_url(settings.database_url)}): {why}")
    return found
