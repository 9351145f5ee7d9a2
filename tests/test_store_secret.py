"""The store with its login, host and database name from AWS Secrets Manager only, as
the migrating team's ``credentials.yaml`` has it (``database: {host, secret_name,
region_name}``; the secret holds ``username``, ``password``, ``host``, ``port``,
``dbname``). moto's standalone server is Secrets Manager; the database is MariaDB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from callback_server import settings as cb_config
from callback_server.store import load_targets, open_store
from tests.support.dbutil import query, scratch_mysql_database
from tests.support.procs import free_port
from tests.support.secrets_manager import REGION, SecretsManagerServer

pytestmark = pytest.mark.integration



def _credentials(tmp_path: Path, secret: str) -> Path:
    """The replaced receiver's credentials.yaml: the host and the secret, no database
    name."""
    path = tmp_path / "credentials.yaml"
    path.write_text(f'database:\n  host: "127.0.0.1"\n  secret_name: "{secret}"\n'
                    f'  region_name: "{REGION}"\n')
    return path


def _targets(tmp_path: Path) -> Path:
    """A database_config.yaml naming targets that do not exist yet: the product makes
    them, and owns them."""
    path = tmp_path / "database_config.yaml"
    path.write_text('tables:\n  robot_status:\n    - table_name: "fleet_robots"\n'
                    '      primary_keys: ["robot_sn"]\n  robot_events:\n'
                    '    - table_name: "fleet_events"\n'
                    '      primary_keys: ["robot_sn", "event_id"]\n')
    return path


async def test_migrate_with_the_database_named_only_by_the_secret_keeps_ownership(
        aws: SecretsManagerServer, tmp_path: Path) -> None:
    """The first lookup of ``store_tables`` must search the secret's database, not an
    empty name: else every owned table is taken for an earlier version's and the targets
    the product made are offered to ``--drop-added-columns``."""
    cfg = _targets(tmp_path)
    with scratch_mysql_database() as url:
        name = f"rds/{uuid.uuid4().hex[:8]}"
        aws.put(name, {"engine": "mariadb", "username": "root", "password": "",
                       "host": "127.0.0.1", "port": 3306, "dbname": url.rsplit("/", 1)[1]})
        for _ in range(2):  # made by the product, then found as its own
            async with open_store(url, targets=load_targets(cfg)) as store:
                await store.migrate()
        before = query(url, "SELECT table_name, how FROM store_tables ORDER BY table_name")
        assert {r["how"] for r in before} == {"created"}
        assert {"fleet_robots", "fleet_events"} <= {r["table_name"] for r in before}

        settings = cb_config.load(None, {"CREDENTIALS_FILE": str(_credentials(tmp_path, name)),
                                         "DATABASE_URL": ""})
        assert "secret_name=" in settings.database_url and "/?" in settings.database_url
        async with open_store(settings.database_url, targets=load_targets(cfg)) as store:
            said = "\n".join(await store.migrate())
        after = query(url, "SELECT table_name, how FROM store_tables ORDER BY table_name")

    assert "target fleet_robots (robot_status): owned (made by this product)" in said
    assert "target fleet_events (robot_events): owned (made by this product)" in said
    assert "earlier version" not in said and "copy the bookkeeping" not in said
    assert "not owned" not in said
    assert after == before


def _check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callback_server", "check-config", "--connect"],
        env={**os.environ, "DATABASE_URL": "", **env}, capture_output=True, text=True,
        timeout=90, check=False)


def test_check_config_says_the_secret_cannot_be_read_not_that_the_database_is_away(
        sm: SecretsManagerServer, tmp_path: Path) -> None:
    """A wrong secret name, Secrets Manager unreachable, no AWS credentials: each is said
    as what it is, naming the secret, and never as a database that does not answer."""
    name = f"rds/{uuid.uuid4().hex[:8]}"
    sm.put(name, {"username": "root", "password": "", "host": "127.0.0.1",
                  "dbname": "test"})
    good = _check_config({**sm.env, "CREDENTIALS_FILE": str(_credentials(tmp_path, name))})
    assert good.returncode == 0, good.stderr

    wrong = _check_config({**sm.env,
                           "CREDENTIALS_FILE": str(_credentials(tmp_path, "rds/no-such"))})
    away = _check_config({**sm.env, "AWS_ENDPOINT_URL_SECRETS_MANAGER":
                          f"http://127.0.0.1:{free_port()}",
                          "CREDENTIALS_FILE": str(_credentials(tmp_path, name))})
    anonymous = {k: v for k, v in sm.env.items() if not k.startswith("AWS_") or
                 k in ("AWS_ENDPOINT_URL_SECRETS_MANAGER", "AWS_REGION", "AWS_CONFIG_FILE",
                       "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")}
    bare = {k: v for k, v in os.environ.items()
            if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_PROFILE")}
    nobody = subprocess.run(
        [sys.executable, "-m", "callback_server", "check-config", "--connect"],
        env={**bare, "DATABASE_URL": "", **anonymous,
             "CREDENTIALS_FILE": str(_credentials(tmp_path, name))},
        capture_output=True, text=True, timeout=90, check=False)
    for run, cause in ((wrong, "ResourceNotFoundException"), (away, "connect"),
                       (nobody, "credentials")):
        said = run.stdout + run.stderr
        assert run.returncode == 1, said
        assert "does not answer" not in said
        assert "Secrets Manager" in said and "rds/" in said, said
        assert cause.lower() in said.lower(), said
        print(json.dumps(said.strip().splitlines()[-1]))
