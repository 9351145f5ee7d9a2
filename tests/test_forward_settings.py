"""FORWARD_TIMEOUT / FORWARD_MAX_RETRIES: one pair of settings for every outbound delivery
(alert webhooks and the REST proxy's callback_url, on the cloud and on the edge), defaults
unchanged when unset."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.errors import ConfigError
from bridge.proxy import RetryPolicy
from bridge.service.settings_loader import masked
from callback_server import settings as config
from callback_server.alerts.rules import load_alert_settings
from callback_server.service import forwarding, proxy_retry
from edge_agent import service as edge_service
from edge_agent import settings as edge_config
from edge_agent.service import EdgeAgent
from tests.support.waiting import eventually_async
from tests.test_proxy import serve


def test_unset_keeps_each_deliverys_defaults() -> None:
    settings = config.load(None, {})
    alerts = forwarding(load_alert_settings(None), settings)
    assert (alerts.delivery.attempts, alerts.delivery.timeout_seconds) == (6, 10.0)
    retry = proxy_retry(settings)
    assert (retry.attempts, retry.timeout) == (6, 10.0)


def test_set_applies_to_alert_webhooks_and_callback_urls(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("delivery: {attempts: 9, timeout_seconds: 20, cap_seconds: 5}\n")
    settings = config.load(None, {"FORWARD_TIMEOUT": "2.5", "FORWARD_MAX_RETRIES": "0",
                                  "ALERT_RULES_FILE": str(rules)})
    alerts = forwarding(load_alert_settings(str(rules)), settings)
    assert (alerts.delivery.attempts, alerts.delivery.timeout_seconds) == (1, 2.5)
    assert alerts.delivery.cap_seconds == 5  # the rest of the file's policy stays
    retry = proxy_retry(settings)
    assert (retry.attempts, retry.timeout) == (1, 2.5)


@pytest.mark.parametrize("env", [{"FORWARD_TIMEOUT": "0"}, {"FORWARD_MAX_RETRIES": "-1"},
                                 {"FORWARD_MAX_RETRIES": "many"}])
def test_a_bad_value_is_refused_naming_it(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        config.load(None, env)


# -- the edge agent: its REST proxy's callback_url pushes -------------------------------------
def test_the_edge_takes_the_same_settings_with_the_same_defaults() -> None:
    unset = edge_service.forward_retry(edge_config.load(None, {"PUDU_CALLBACK_CODE": "c"}))
    default = RetryPolicy()
    assert (unset.attempts, unset.timeout) == (default.attempts, default.timeout) == (6, 10.0)
    settings = edge_config.load(None, {"PUDU_CALLBACK_CODE": "c", "FORWARD_TIMEOUT": "2.5",
                                       "FORWARD_MAX_RETRIES": "0"})
    retry = edge_service.forward_retry(settings)
    assert (retry.attempts, retry.timeout) == (1, 2.5)
    # check-config shows them (and no longer says they are not honoured here)
    shown = masked(settings)
    assert (shown["forward_timeout"], shown["forward_max_retries"]) == (2.5, 0)
    assert not any("FORWARD" in w for w in settings.source_warnings)


@pytest.mark.parametrize("env", [{"FORWARD_TIMEOUT": "0"}, {"FORWARD_MAX_RETRIES": "-1"},
                                 {"FORWARD_MAX_RETRIES": "20"}])
def test_the_edge_refuses_a_bad_value_naming_it(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        edge_config.load(None, {"PUDU_CALLBACK_CODE": "c", **env})


async def test_an_edge_callback_url_push_makes_forward_max_retries_plus_one_attempts(
        tmp_path: Path) -> None:
    """POST /mqtt/subscribe with a callback_url on the edge's admin listener: a receiver
    that always fails gets exactly FORWARD_MAX_RETRIES + 1 attempts, then none."""
    attempts: list[bytes] = []

    async def hook(request: Request) -> Response:
        attempts.append(await request.body())
        return Response(status_code=500)

    broker = f"fwd-{uuid.uuid4().hex[:8]}"
    settings = edge_config.load(None, {
        "PUDU_CALLBACK_CODE": "c", "MQTT_URL": f"mqtt://{broker}", "MQTT_BACKEND": "memory",
        "ORG_ID": "acme", "GATEWAY_ID": "gw1", "OUTBOX_PATH": str(tmp_path / "outbox.db"),
        "PROXY_TOKEN": "edge-token", "CALLBACK_URL_ALLOW": "127.0.0.1",
        "FORWARD_MAX_RETRIES": "2", "FORWARD_TIMEOUT": "5"})
    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serve(receiver) as url, EdgeAgent(settings) as agent, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=agent.admin_app), base_url="http://admin",
            headers={"Authorization": "Bearer edge-token"}) as admin:
        r = await admin.post("/mqtt/subscribe", json={
            "topic": "org/acme/device/gw1/hooks/#", "callback_url": f"{url}/hook"})
        assert r.status_code == 200, r.text
        sub_id = r.json()["id"]
        r = await admin.post("/mqtt/publish", json={
            "topic": "org/acme/device/gw1/hooks/x", "payload": {"n": 1}})
        assert r.status_code == 200, r.text

        async def given_up() -> dict[str, Any] | None:
            (listed,) = (await admin.get("/mqtt/subscriptions")).json()["items"]
            return listed if listed["failed"] else None

        listed = await eventually_async(given_up, within=20, what="the delivery given up")
        await asyncio.wait_for(agent.proxy.flush(), 5)
        log = (await admin.get(f"/mqtt/subscriptions/{sub_id}/deliveries")).json()["items"]
    assert len(attempts) == 3 and len(set(attempts)) == 1  # one message, tried 2 + 1 times
    assert (listed["delivered"], listed["failed"], listed["failed_attempts"]) == (0, 1, 3)
    assert [item["attempt"] for item in log] == [3, 2, 1]
