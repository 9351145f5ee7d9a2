"""Settings: YAML + environment, masked output, and the shipped examples stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import ConfigError
from bridge.service.settings_loader import masked
from callback_server import settings as cb_config
from callback_server.store import load_targets
from edge_agent import settings as edge_config

EXAMPLES = Path(__file__).resolve().parents[1] / "config.example"


def test_shipped_examples_load() -> None:
    edge = edge_config.load(str(EXAMPLES / "edge-agent.yaml"), {"PUDU_CALLBACK_CODE": "c" * 32})
    assert (edge.http_port, edge.admin_host, edge.mqtt_client_id) == (
        8000, "127.0.0.1", "edge-example-org-example-gateway")
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
        ({"PUDU_CALLBACK_CODE": "x", "BATCH_FRAMES": "sometimes"}, "'always'"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        edge_config.load(None, env)


@pytest.mark.parametrize(("value", "mode"), [("always", "always"), ("on", "on"),
                                             ("true", "on"), ("1", "on"), ("off", "off"),
                                             ("no", "off"), (" Always ", "always"),
                                             ("ON", "on"), ("sometimes", None)])
def test_batch_frames_was_a_flag_and_its_spellings_still_mean_on_and_off(
        value: str, mode: str | None) -> None:
    env = {"PUDU_CALLBACK_CODE": "x", "BATCH_FRAMES": value}
    if mode is None:
        with pytest.raises(ConfigError, match="batch_frames"):
            edge_config.load(None, env)
    else:
        assert edge_config.load(None, env).batch_frames == mode


@pytest.mark.parametrize("days", ["0.5", "-1"])
def test_history_shorter_than_the_consoles_chart_is_refused(days: str) -> None:
    with pytest.raises(ConfigError, match="history_retention_days"):
        cb_config.load(None, {"HISTORY_RETENTION_DAYS": days})


def test_systemd_credentials_sit_between_the_file_and_the_environment(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pudu_callback_code").write_text("code-from-credential\n")
    (creds / "proxy_token").write_text("token-from-credential")
    (creds / "mqtt_key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (tmp_path / "cert.pem").write_text("cert")
    config = tmp_path / "edge.yaml"
    config.write_text(f"pudu_callback_code: from-file\nproxy_token: from-file\n"
                      f"tls: {{cert_file: {tmp_path / 'cert.pem'}}}\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "PROXY_TOKEN": "from-env"}
    s = edge_config.load(str(config), env)
    assert s.pudu_callback_code.get_secret_value() == "code-from-credential"  # over the file
    assert s.proxy_token is not None and s.proxy_token.get_secret_value() == "from-env"
    assert s.tls.key_file == str(creds / "mqtt_key")  # the key file nobody else named


def test_a_missing_required_secret_names_its_credential_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        edge_config.load(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert "PUDU_CALLBACK_CODE" in str(info.value)
    assert "$CREDENTIALS_DIRECTORY/pudu_callback_code" in str(info.value)


def test_database_password_fills_in_the_url(tmp_path: Path) -> None:
    (tmp_path / "database_password").write_text("p@ss:w/rd\n")
    s = cb_config.load(None, {"CREDENTIALS_DIRECTORY": str(tmp_path),
                              "DATABASE_URL": "mysql://app@db:3306/fleet"})
    assert s.database_url == "mysql://app:p%40ss%3Aw%2Frd@db:3306/fleet"
    assert "p%40ss" not in str(masked(s))
    with pytest.raises(ConfigError, match="database_password"):
        cb_config.load(None, {"DATABASE_PASSWORD": "x", "DATABASE_URL": "sqlite:///x.db"})


@pytest.mark.parametrize(("env", "warned"), [
    ({}, []),  # unset: paced at AWS's limits
    ({"PUBLISH_RATE_LIMIT": "100", "PUBLISH_BYTE_LIMIT": "524288"}, []),
    ({"PUBLISH_RATE_LIMIT": "50"}, []),
    ({"PUBLISH_RATE_LIMIT": "0"}, ["PUBLISH_RATE_LIMIT is 0 (unlimited)"]),
    ({"PUBLISH_RATE_LIMIT": "150"}, ["PUBLISH_RATE_LIMIT is 150"]),
    ({"PUBLISH_BYTE_LIMIT": "0"}, ["PUBLISH_BYTE_LIMIT is 0 (unlimited)"]),
    ({"PUBLISH_BYTE_LIMIT": "1048576"}, ["PUBLISH_BYTE_LIMIT is 1048576"]),
])
def test_check_config_warns_of_pacing_over_aws_iots_limits(env: dict[str, str],
                                                           warned: list[str]) -> None:
    """On AWS IoT Core a drain paced above 100 publishes/s (or 512 KiB/s) per connection,
    or not at all, trips AWS's throttling: check-config says so (a broker of one's own
    may take more, so only with MQTT_BACKEND=awsiot)."""
    from edge_agent import config_checks

    base = {"PUDU_CALLBACK_CODE": "c", "MQTT_BACKEND": "awsiot"}
    found = [w for w in config_checks.warnings(edge_config.load(None, {**base, **env}))
             if "AWS IoT Core throttles" in w]
    assert [w.split(" with ")[0] for w in found] == warned
    off_aws = edge_config.load(None, {**base, **env, "MQTT_BACKEND": "paho"})
    assert not any("throttles" in w for w in config_checks.warnings(off_aws))


def test_check_config_refuses_a_proxy_prefix_run_would_refuse(tmp_path: Path) -> None:
    """A ``$`` or wildcard in proxy_allowed_prefixes stopped ``run`` (the proxy refuses it)
    while check-config passed: now both say so, naming the key."""
    from edge_agent import config_checks

    cfg = tmp_path / "e.yaml"
    env = {"PUDU_CALLBACK_CODE": "c", "OUTBOX_PATH": str(tmp_path / "outbox.db")}
    for prefixes, refused in (("['$aws/']", True), ("['org/+/']", True),
                              ("['org/', '']", False), ("[]", False)):
        cfg.write_text(f"proxy_allowed_prefixes: {prefixes}\n")
        found = config_checks.problems(edge_config.load(str(cfg), env))
        assert [p.split(":")[0] for p in found] == (
            ["proxy_allowed_prefixes"] if refused else []), (prefixes, found)
