"""The database login from AWS Secrets Manager (moto's server), rotated under a running
callback server: storing resumes within 30 s, nothing is lost, the password is never shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pymysql
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.envelope import Envelope
from tests.support.dbutil import query
from tests.support.secrets_manager import REGION, SecretsManagerServer, scratch_mysql_user
from tests.support.services import callback_server

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"


def _envelope(i: int) -> bytes:
    env = Envelope(id=f"rot-{i}", type="notifyRobotPower", org="acme", device="R1",
                   gateway="gw", ts=1700000000 + i, received_at=1700000001 + i,
                   data={"battery_level": i % 100}, raw={"power": i}, channel="power")
    return env.to_json()


def _publish(prefix: str, numbers: range) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        for i in numbers:
            client.publish(f"{prefix}/org/acme/device/R1/power", _envelope(i),
                           qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _rotate(user: str, password: str) -> int:
    """New password on the user, then every session of the user killed; how many."""
    with pymysql.connect(host="127.0.0.1", user="root", password="") as conn:
        cur = conn.cursor()
        cur.execute(f"ALTER USER '{user}'@'%%' IDENTIFIED BY %s", (password,))
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (user,))
        ids = [row[0] for row in cur.fetchall()]
        for session in ids:
            try:
                cur.execute(f"KILL {int(session)}")
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != 1094:  # Unknown thread id: it ended on its own meanwhile
                    raise
    return len(ids)


def test_a_rotated_password_is_read_again_and_nothing_is_lost(tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with SecretsManagerServer(tmp_path / "moto.log") as sm, \
            scratch_mysql_user() as (user, first, url):
        database = url.rsplit("/", 1)[1]
        name = f"rds/{uuid.uuid4().hex[:8]}"
        login: dict[str, Any] = {"engine": "mariadb", "username": user, "password": first,
                                 "host": "127.0.0.1", "port": 3306, "dbname": database}
        sm.put(name, login)
        # The seed's own shape: credentials.yaml names the host and the secret.
        creds = tmp_path / "credentials.yaml"
        creds.write_text(f'database:\n  host: "127.0.0.1"\n  secret_name: "{name}"\n'
                         f'  region_name: "{REGION}"\n')
        env = {**sm.env, "CREDENTIALS_FILE": str(creds), "TOPIC_PREFIX": prefix,
               "LOG_LEVEL": "DEBUG"}

        check = subprocess.run(
            [sys.executable, "-m", "callback_server", "check-config", "--connect"],
            env={**os.environ, **env, "DATABASE_URL": ""}, capture_output=True, text=True,
            timeout=60, check=False)
        assert check.returncode == 0, check.stderr
        shown = json.loads(check.stdout)
        assert shown["database_url"].startswith("mysql://127.0.0.1/?secret_name=")
        assert first not in check.stdout + check.stderr

        with callback_server(tmp_path, BROKER, "", **env) as cs:
            _publish(prefix, range(20))
            cs.wait_health("stored", 20)
            second = uuid.uuid4().hex
            sm.put(name, {**login, "password": second})
            assert _rotate(user, second) >= 1  # the server's pooled sessions
            rotated = time.monotonic()
            _publish(prefix, range(20, 40))  # acknowledged by the broker, held by us
            cs.wait_health("stored", 40, timeout=60)
            resumed = time.monotonic() - rotated
            health = httpx.get(cs.url + "/callback/health").text
            metrics = httpx.get(cs.url + "/metrics", headers=cs.auth).text
        log = cs.log_path.read_text()
        stored = query(f"mysql://root:@127.0.0.1:3306/{database}",
                       "SELECT id FROM mqtt_message_log")

    print(f"storing resumed {resumed:.1f} s after the rotation")
    assert resumed < 30
    assert sorted(r["id"] for r in stored) == sorted(f"rot-{i}" for i in range(40))
    for secret in (first, second):
        assert secret not in log and secret not in health and secret not in metrics
    assert "Access denied" in log  # the refusal was seen and said (its text has no password)
