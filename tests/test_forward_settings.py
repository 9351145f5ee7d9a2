"""FORWARD_TIMEOUT / FORWARD_MAX_RETRIES: one pair of settings for every outbound delivery
(alert webhooks and the REST proxy's callback_url), defaults unchanged when unset."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import ConfigError
from callback_server import settings as config
from callback_server.alerts.rules import load_alert_settings
from callback_server.service import forwarding, proxy_retry


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
