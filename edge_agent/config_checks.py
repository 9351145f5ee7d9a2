"""The edge agent's pre-start checks (bridge.service.preflight): run by
``check-config`` and ``run``."""

from __future__ import annotations

import time
from pathlib import Path

from bridge.errors import ConfigError
from bridge.proxy.core import check_prefixes
from bridge.service.preflight import (
    broker_reachable,
    mqtt_transport,
    template_values,
    writable_file,
)
from bridge.service.settings_loader import mask_url
from bridge.topic import AWS_MAX_TOPIC_BYTES, MAX_SN_BYTES, TopicScheme
from edge_agent.builtin_commands import BUILTIN_NAMES
from edge_agent.forwarding import ForwardPolicy
from edge_agent.forwarding import warnings as policy_warnings
from edge_agent.plugins import problems as plugin_problems
from edge_agent.publisher import AWS_BYTES_PER_SECOND, AWS_PUBLISHES_PER_SECOND
from edge_agent.pudu.settings import PuduApiSettings
from edge_agent.settings import EdgeSettings


def problems(settings: EdgeSettings, config_path: str | None = None) -> list[str]:
    """One line per problem; empty when ``run`` would start. ``config_path`` (the file
    read) lets a template placeholder be shown with its line."""
    from edge_agent.service import mqtt_settings

    found: list[str] = []
    identity(found, settings, config_path)
    scheme = TopicScheme(settings.org_id, settings.topic_prefix)
    mqtt_transport(found, settings.mqtt_backend, lambda: mqtt_settings(settings, scheme))
    writable_file(found, "OUTBOX_PATH", settings.outbox_path)
    if settings.log_file:
        writable_file(found, "LOG_FILE", Path(settings.log_file))
    if _same_address(settings):
        found.append(f"EDGE_ADMIN_PORT: the admin listener needs a port of its own "
                     f"({settings.admin_port} is EDGE_HTTP_PORT too)")
    if settings.proxy_allowed_prefixes:
        try:
            check_prefixes(settings.proxy_allowed_prefixes)
        except ConfigError as exc:
            found.append(f"proxy_allowed_prefixes: {exc}")
    found.extend(plugin_problems(settings, BUILTIN_NAMES))
    return found


def identity(found: list[str], settings: EdgeSettings, config_path: str | None) -> None:
    """ORG_ID / GATEWAY_ID are not the template's placeholders: unedited gateways would
    all connect with one client id and the broker would disconnect them in turn."""
    template_values(found, {"org_id": settings.org_id, "gateway_id": settings.gateway_id},
                    config_path)


def _same_address(settings: EdgeSettings) -> bool:
    """Both listeners on one port where their addresses overlap: the second cannot bind."""
    if settings.http_port != settings.admin_port or settings.http_port == 0:
        return False  # port 0: each gets its own free port
    anywhere = {"", "0.0.0.0", "::"}
    hosts = {settings.http_host, settings.admin_host}
    return len(hosts) == 1 or bool(hosts & anywhere)


def warnings(settings: EdgeSettings) -> list[str]:
    """Allowed but likely a mistake (status or events not forwarded, a Pudu API key
    without shops to poll): said, not refused."""
    found = policy_warnings(ForwardPolicy.of(settings))
    room = sn_room(settings)
    if room < MAX_SN_BYTES:
        found.append(f"TOPIC_PREFIX and ORG_ID leave {room} bytes for a robot's sn in AWS "
                     f"IoT's 256-byte topics (the product allows {MAX_SN_BYTES}): callbacks "
                     "of robots with longer sns will be refused with 422")
    found.extend(aws_pacing(settings))
    pudu = settings.pudu
    if pudu.configured:
        found.extend(pudu.schedule_warnings(time.time()))
    if pudu.configured and not pudu.shop_ids and pudu.poll_interval_seconds > 0:
        found.append("PUDU_API_KEY is set but PUDU_SHOP_IDS is empty: scheduled polling "
                     "is off (pudu.* commands still work)")
    return found


def aws_pacing(settings: EdgeSettings) -> list[str]:
    """On AWS IoT Core, PUBLISH_RATE_LIMIT / PUBLISH_BYTE_LIMIT set to unlimited or above
    its per-connection limits: a drain after an outage would be throttled by AWS (the
    connection's publishes refused or slowed) instead of paced here."""
    if settings.mqtt_backend != "awsiot":
        return []
    found = []
    rate, size = settings.publish_limits()
    for name, value, limit, unit in (
            ("PUBLISH_RATE_LIMIT", rate, AWS_PUBLISHES_PER_SECOND, "publishes/s"),
            ("PUBLISH_BYTE_LIMIT", size, AWS_BYTES_PER_SECOND, "bytes/s")):
        if value == 0 or value > limit:
            said = "0 (unlimited)" if value == 0 else f"{value:.15g}"
            found.append(f"{name} is {said} with MQTT_BACKEND=awsiot: AWS IoT Core throttles "
                         f"a connection above {limit:.15g} {unit}, so a drain after an outage "
                         f"would trip it; leave {name} unset (paced at AWS's limit) or set "
                         f"it at most {limit:.15g}")
    return found


def sn_room(settings: EdgeSettings) -> int:
    """The longest sn whose topics fit the broker's limit on every robot channel (the
    longest is ``status``; ``callback/{type}`` adds its type); MAX_SN_BYTES off AWS."""
    if settings.mqtt_backend != "awsiot":
        return MAX_SN_BYTES
    scheme = TopicScheme(settings.org_id, settings.topic_prefix)
    overhead = len(str(scheme.device("x", "status")).encode()) - 1
    return max(0, min(MAX_SN_BYTES, AWS_MAX_TOPIC_BYTES - overhead))


async def connect_problems(settings: EdgeSettings, config_path: str | None = None
                           ) -> list[str]:
    """``check-config --connect``: the settings' problems, then a real broker connect."""
    from edge_agent.service import mqtt_settings

    found = problems(settings, config_path)
    if found:
        return found
    scheme = TopicScheme(settings.org_id, settings.topic_prefix)
    transport = mqtt_transport(found, settings.mqtt_backend,
                               lambda: mqtt_settings(settings, scheme))
    if transport is not None:
        await broker_reachable(found, transport, mask_url(settings.mqtt_url))
    return found


def next_runs(pudu: PuduApiSettings, now: float | None = None) -> str:
    """The schedule and its next three run times, so an installer sees what it means."""
    return pudu.schedule.describe(time.time() if now is None else now)
