"""The replaced systems' setting names as an operator meets them: check-config names every
seed name it used or does not honour, says when the product's name won, and the services
honour what they accept (PORT moves the webhook listener, LOG_FILE gets the log)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from bridge.service.aws_secrets import RefreshingLogin, SecretRef
from tests.support.procs import free_port
from tests.support.secrets_manager import REGION, SecretsManagerServer
from tests.support.services import ServiceProcess

BROKER = "mqtt://127.0.0.1:1883"


def cli(module: str, *args: str, env: dict[str, str], cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MQTT_", "DATABASE_", "DB_", "EDGE_", "CALLBACK_"))
            and k not in ("PORT", "HOST", "DEBUG", "LOG_FILE")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=60, env={**base, **env}, check=False, cwd=cwd,
                          )


def _edge(tmp: Path, **extra: str) -> dict[str, str]:
    return {"PUDU_CALLBACK_CODE": "c", "OUTBOX_PATH": str(tmp / "outbox.db"),
            "EDGE_ADMIN_PORT": str(free_port()), **extra}


def test_port_9000_moves_the_webhook_listener_and_check_config_says_why(tmp_path: Path) -> None:
    done = cli("edge_agent", "check-config", env=_edge(tmp_path, PORT="9000"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["http_port"] == 9000
    assert ("note: PORT (a seed name) used for http_port; the product's name is "
            "EDGE_HTTP_PORT") in done.stderr


@pytest.mark.integration
def test_the_seeds_port_and_log_file_are_honoured_by_a_running_agent(tmp_path: Path) -> None:
    port, log_file = free_port(), tmp_path / "pudu_callbacks.log"
    env = _edge(tmp_path, HOST="127.0.0.1", PORT=str(port), LOG_FILE=str(log_file),
                MQTT_URL=BROKER, ORG_ID="acme", GATEWAY_ID=f"g{uuid.uuid4().hex[:8]}")
    env = {**env, "EDGE_HTTP_PORT": "", "EDGE_HTTP_HOST": ""}  # only the seed's names
    with ServiceProcess("edge_agent", env, "/api/pudu/webhook/health", port,
                        tmp_path / "edge.log") as edge:
        assert httpx.get(edge.url + "/api/pudu/webhook/health").status_code == 200
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any("PORT (a seed name) used for http_port" in line["msg"] for line in lines)
    assert any("listening" in line["msg"] for line in lines)
    assert "listening" in edge.log_path.read_text()  # stderr keeps every line too


def test_a_seed_name_not_honoured_is_named_with_the_products(tmp_path: Path) -> None:
    done = cli("edge_agent", "check-config", env=_edge(tmp_path, DEBUG="true",
                                                      ENABLE_CALLBACKS="true"))
    assert done.returncode == 0, done.stderr
    assert ("warning: DEBUG is set but not honoured by this service: the Flask debug switch "
            "has no counterpart; for verbose logs set LOG_LEVEL=DEBUG") in done.stderr
    assert "warning: ENABLE_CALLBACKS is set but not honoured" in done.stderr


def test_alias_and_product_name_both_set_the_product_wins_and_says_so(tmp_path: Path) -> None:
    done = cli("edge_agent", "check-config",
               env=_edge(tmp_path, PORT="9000", EDGE_HTTP_PORT="9100"))
    assert json.loads(done.stdout)["http_port"] == 9100
    assert ("note: PORT=9000 is not used: the product's name EDGE_HTTP_PORT is set too and "
            "wins") in done.stderr
    done = cli("callback_server", "check-config",
               env={"CALLBACK_PORT": "3999", "CALLBACK_HTTP_PORT": "3998",
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}"})
    assert json.loads(done.stdout)["http_port"] == 3998
    assert "CALLBACK_PORT=3999 is not used" in done.stderr


def test_a_user_less_mysql_url_without_a_secret_fails_check_config(tmp_path: Path) -> None:
    for env in ({"DATABASE_URL": "mysql://127.0.0.1:3306/test"},
                {"DB_HOST": "127.0.0.1", "DB_NAME": "test"}):
        done = cli("callback_server", "check-config", env=env)
        assert done.returncode == 1, done.stdout
        assert "DATABASE_URL: DATABASE_URL names no user and no secret" in done.stderr
        assert "Traceback" not in done.stderr
    # with the user it passes (and the password given by DB_PASSWORD is never shown)
    done = cli("callback_server", "check-config",
               env={"DB_HOST": "127.0.0.1", "DB_NAME": "test", "DB_USER": "root",
                    "DB_PASSWORD": "s3cret-pw"})
    assert done.returncode == 0, done.stderr
    assert "s3cret-pw" not in done.stdout + done.stderr


def test_replicas_sharing_a_port_must_each_name_their_mqtt_client(tmp_path: Path) -> None:
    """The default client id names the host: two replicas of one host would take each
    other's broker session, so CALLBACK_HTTP_REUSE_PORT without MQTT_CLIENT_ID is refused."""
    env = {"CALLBACK_HTTP_REUSE_PORT": "true", "DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"}
    done = cli("callback_server", "check-config", env=env)
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "give each its own MQTT_CLIENT_ID" in lines[0], done.stderr
    assert "Value error" not in lines[0]
    done = cli("callback_server", "check-config", env={**env, "MQTT_CLIENT_ID": "cs-a"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["http_reuse_port"] is True


def test_a_named_replica_shares_the_port_in_one_group_with_a_client_id_of_its_own(
        tmp_path: Path) -> None:
    """CALLBACK_REPLICA (the systemd template's instance, callback-server@2): replicas
    with one environment file share the port and the stream, each its own broker session."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}", "MQTT_CLIENT_ID": "cloud-a"}
    shown = []
    for replica in ("1", "2"):
        done = cli("callback_server", "check-config", env={**env, "CALLBACK_REPLICA": replica})
        assert done.returncode == 0, done.stderr
        shown.append(json.loads(done.stdout))
    assert [s["mqtt_client_id"] for s in shown] == ["cloud-a-1", "cloud-a-2"]
    assert all(s["http_reuse_port"] and s["share_group"] == "callback-server" for s in shown)
    done = cli("callback_server", "check-config",
               env={**env, "CALLBACK_REPLICA": "2", "SHARE_GROUP": "ingest"})
    assert json.loads(done.stdout)["share_group"] == "ingest"  # a group set stays
    del env["MQTT_CLIENT_ID"]  # the host's default id, suffixed: still one per replica
    done = cli("callback_server", "check-config", env={**env, "CALLBACK_REPLICA": "3"})
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"callback-server-.+-3", json.loads(done.stdout)["mqtt_client_id"])
    done = cli("callback_server", "check-config", env={**env, "CALLBACK_REPLICA": "a/b"})
    assert done.returncode == 1 and "replica" in done.stderr, done.stderr


def test_a_dotenv_file_is_not_read_and_check_config_says_so(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=9000\n")
    done = cli("edge_agent", "check-config", env=_edge(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["http_port"] == 8000
    assert f"warning: {tmp_path / '.env'} is not read" in done.stderr


@pytest.mark.integration
async def test_a_refused_login_reads_the_secret_again_at_most_every_period(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with SecretsManagerServer(tmp_path / "moto.log") as sm:
        for name, value in sm.env.items():
            monkeypatch.setenv(name, value)
        secret = f"db/{uuid.uuid4().hex[:8]}"
        sm.put(secret, {"username": "app", "password": "one"})
        login = RefreshingLogin(SecretRef(secret, REGION), refresh_seconds=30)
        assert (await login.get()).password == "one"
        sm.put(secret, {"username": "app", "password": "two"})
        assert (await login.get()).password == "one"  # not refused: no call at all
        login.stale()
        assert (await login.get()).password == "two"  # the first refusal: at once
        sm.put(secret, {"username": "app", "password": "three"})
        login.stale()
        assert (await login.get()).password == "two"  # within the period: not again
        assert repr(await login.get()).count("two") == 0  # never in a repr
