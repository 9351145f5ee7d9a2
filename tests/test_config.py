"""Settings: YAML + environment, masked output, and the shipped examples stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import masked
from bridge.errors import ConfigError
from callback_server import config as cb_config
from callback_server.store import load_targets
from edge_agent import config as edge_config

EXAMPLES = Path(__file__).resolve().parents[1] / "config.example"


def test_shipped_examples_load() -> None:
    edge = edge_config.load(str(EXAMPLES / "edge-agent.yaml"), {"PUDU_CALLBACK_CODE": "c" * 32})
    assert (edge.http_port, edge.admin_host, edge.mqtt_client_id) == (
        8000, "127.0.0.1", "edge-acme-site-1")
    cb = cb_config.load(str(EXAMPLES / "callback-server.yaml"), {})
    assert (cb.http_port, cb.share_group) == (3005, "ingest")
    targets = load_targets(EXAMPLES / "database_config.yaml")
    assert [t.qualified for t in targets.robot_events] == [
        "fleet.mnt_robot_events", "analytics.mnt_robot_events"]


def test_environment_overrides_file_and_secrets_are_masked(tmp_path: Path) -> None:
    cfg = tmp_path / "e.yaml"
    cfg.write_text("pudu_callback_code: from-file\nhttp_port: 9000\norg_id: a\n")
    s = edge_config.load(str(cfg), {"EDGE_HTTP_PORT": "9100", "PROXY_TOKEN": "tok",
                                    "MQTT_URL": "mqtts://u:pw@h:8883"})
    shown = masked(s)
    assert shown["http_port"] == 9100 and shown["pudu_callback_code"] == "********"
    assert shown["proxy_token"] == "********"
    assert shown["mqtt_url"] == "mqtts://u:********@h:8883"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "PUDU_CALLBACK_CODE"),
        ({"PUDU_CALLBACK_CODE": "x", "EDGE_HTTP_PORT": "http"}, "http_port"),
        ({"PUDU_CALLBACK_CODE": "x", "ORG_ID": "a/b"}, "org_id"),
        ({"PUDU_CALLBACK_CODE": "x", "LOG_LEVEL": "loud"}, "log_level"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        edge_config.load(None, env)
