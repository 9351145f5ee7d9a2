"""Where settings come from: one precedence for every pair of sources (product env > seed
alias > systemd credential > Secrets Manager > config files), seed names, credentials.yaml.

Secrets Manager is moto's standalone server (a real process); the database is MariaDB.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from bridge.errors import ConfigError, StoreError
from callback_server import settings as cb_config
from callback_server.store import open_store
from edge_agent import settings as edge_config
from tests.support.secrets_manager import REGION, SecretsManagerServer, scratch_mysql_user


def _creds(tmp_path: Path, **files: str) -> str:
    directory = tmp_path / "creds"
    directory.mkdir(exist_ok=True)
    for name, value in files.items():
        (directory / name).write_text(value)
    return str(directory)


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return str(path)


def _secret(aws: SecretsManagerServer, value: dict[str, object]) -> str:
    name = f"pudu/{uuid.uuid4().hex[:8]}"
    aws.put(name, value)
    return name


# --- each pair of sources, the higher one first --------------------------------------

def test_product_env_beats_seed_alias() -> None:
    s = edge_config.load(None, {"PUDU_CALLBACK_CODE": "c", "EDGE_HTTP_PORT": "9100",
                                "PORT": "9000"})
    assert s.http_port == 9100
    assert any("PORT=9000 is not used" in n and "EDGE_HTTP_PORT" in n for n in s.source_notes)


def test_product_env_beats_credential(tmp_path: Path) -> None:
    s = edge_config.load(None, {"PUDU_CALLBACK_CODE": "c", "PROXY_TOKEN": "from-env",
                                "CREDENTIALS_DIRECTORY": _creds(tmp_path, proxy_token="cred")})
    assert s.proxy_token is not None and s.proxy_token.get_secret_value() == "from-env"
    assert "proxy_token: PROXY_TOKEN wins over the credential proxy_token" in s.source_notes


def test_product_env_beats_secret(aws: SecretsManagerServer) -> None:
    name = _secret(aws, {"callback_code": "from-secret"})
    s = edge_config.load(None, {"PUDU_CALLBACK_CODE": "from-env", "PUDU_SECRET_NAME": name,
                                "AWS_REGION": REGION})
    assert s.pudu_callback_code.get_secret_value() == "from-env"
    assert any("PUDU_CALLBACK_CODE wins over secret" in n for n in s.source_notes)


def test_product_env_beats_file(tmp_path: Path) -> None:
    s = edge_config.load(_file(tmp_path, "pudu_callback_code: c\nhttp_port: 8100\n"),
                         {"EDGE_HTTP_PORT": "8200"})
    assert s.http_port == 8200
    assert "http_port: EDGE_HTTP_PORT wins over settings.yaml" in s.source_notes


def test_seed_alias_beats_credential(tmp_path: Path) -> None:
    s = cb_config.load(_file(tmp_path, "database_url: mysql://app@db/fleet\n"), {
        "DB_PASSWORD": "from-alias",
        "CREDENTIALS_DIRECTORY": _creds(tmp_path, database_password="from-credential")})
    assert s.database_url == "mysql://app:from-alias@db/fleet"
    assert ("database_password: DB_PASSWORD wins over the credential database_password"
            in s.source_notes)


@pytest.mark.integration  # connects to the shared MariaDB as a scratch user
def test_seed_alias_beats_secret(aws: SecretsManagerServer) -> None:
    """DB_USER names the login; the secret only fills in what is left (the password)."""
    with scratch_mysql_user() as (user, password, url):
        name = _secret(aws, {"username": "somebody-else", "password": password})
        s = cb_config.load(None, {"DATABASE_URL": url, "DB_USER": user,
                                  "DATABASE_SECRET_NAME": name, "AWS_REGION": REGION})
        assert any("DB_USER=" in n and "not used" in n for n in s.source_notes)
        # DATABASE_URL is the product's name for every part: it wins over DB_USER ...
        s = cb_config.load(None, {"DB_HOST": "127.0.0.1", "DB_NAME": url.rsplit("/", 1)[1],
                                  "DB_USER": user, "DATABASE_SECRET_NAME": name,
                                  "AWS_REGION": REGION})
        assert f"mysql://{user}@127.0.0.1/" in s.database_url
        # ... and DB_USER over the secret's username: the connection is the alias's user.
        assert _pings(s.database_url)


def test_credential_beats_secret(tmp_path: Path, aws: SecretsManagerServer) -> None:
    name = _secret(aws, {"callback_code": "from-secret", "api_secret": "api-from-secret"})
    s = edge_config.load(None, {
        "PUDU_SECRET_NAME": name, "AWS_REGION": REGION,
        "CREDENTIALS_DIRECTORY": _creds(tmp_path, pudu_callback_code="from-credential")})
    assert s.pudu_callback_code.get_secret_value() == "from-credential"
    assert s.pudu.api_secret is not None
    assert s.pudu.api_secret.get_secret_value() == "api-from-secret"  # nothing above it


def test_credential_beats_file_for_the_mqtt_key(tmp_path: Path) -> None:
    """Issue 26: a key file named in config.yaml won over the mqtt_key credential, so a
    rotated key put in the credential was silently ignored."""
    for name in ("cert.pem", "old-key.pem"):
        (tmp_path / name).write_text(name)
    creds = _creds(tmp_path, mqtt_key="-----BEGIN PRIVATE KEY-----\n")
    config = _file(tmp_path, f"pudu_callback_code: c\ntls:\n  cert_file: {tmp_path}/cert.pem\n"
                             f"  key_file: {tmp_path}/old-key.pem\n")
    s = edge_config.load(config, {"CREDENTIALS_DIRECTORY": creds})
    assert s.tls.key_file == f"{creds}/mqtt_key"
    assert "tls.key_file: the credential mqtt_key wins over settings.yaml" in s.source_notes
    # MQTT_KEY_FILE (the product's env name) still beats the credential
    s = edge_config.load(config, {"CREDENTIALS_DIRECTORY": creds,
                                  "MQTT_KEY_FILE": f"{tmp_path}/old-key.pem"})
    assert s.tls.key_file == f"{tmp_path}/old-key.pem"


def test_secret_beats_file(tmp_path: Path, aws: SecretsManagerServer) -> None:
    name = _secret(aws, {"callback_code": "from-secret"})
    s = edge_config.load(_file(tmp_path, "pudu_callback_code: from-file\n"),
                         {"PUDU_SECRET_NAME": name, "AWS_REGION": REGION})
    assert s.pudu_callback_code.get_secret_value() == "from-secret"
    assert any("wins over settings.yaml" in n for n in s.source_notes)


def test_secret_login_beats_a_login_in_the_file(tmp_path: Path) -> None:
    config = _file(tmp_path, "database_url: mysql://app:old@db:3306/fleet\n"
                             "database_password: older\n")
    s = cb_config.load(config, {"DATABASE_SECRET_NAME": "prod/db", "AWS_REGION": REGION})
    assert s.database_url == f"mysql://db:3306/fleet?secret_name=prod%2Fdb&region_name={REGION}"
    notes = " | ".join(s.source_notes)
    assert "database_password from the config file is not used" in notes
    assert "user in database_url (config file) is not used" in notes


def test_a_password_above_the_secret_is_used_and_said() -> None:
    """The environment's password wins over the secret's, and check-config says that a
    rotation of the secret will not reach it."""
    s = cb_config.load(None, {"DATABASE_URL": "mysql://app@db/fleet", "DB_PASSWORD": "pw",
                              "DATABASE_SECRET_NAME": "prod/db"})
    assert s.database_url == "mysql://app:pw@db/fleet?secret_name=prod%2Fdb"
    assert ("database_password (DB_PASSWORD) is used, not the secret's: a rotation of the "
            "secret does not reach it") in s.source_notes


def test_seed_alias_beats_file(tmp_path: Path) -> None:
    s = edge_config.load(_file(tmp_path, "pudu_callback_code: c\nhttp_port: 8100\n"),
                         {"PORT": "9000", "HOST": "127.0.0.1"})
    assert (s.http_port, s.http_host) == (9000, "127.0.0.1")
    assert "http_port: PORT wins over settings.yaml" in s.source_notes
    assert any(n.startswith("PORT (a seed name) used for http_port") for n in s.source_notes)


# --- seed names ----------------------------------------------------------------------

def test_seed_database_parts_make_the_url() -> None:
    s = cb_config.load(None, {"DB_HOST": "db.example", "DB_PORT": "3307", "DB_NAME": "pudu",
                              "DB_USER": "ingest", "DB_PASSWORD": "p@ss"})
    assert s.database_url == "mysql://ingest:p%40ss@db.example:3307/pudu"
    env = {"DATABASE_URL": "mysql://app@db/fleet", "DB_HOST": "other"}
    s = cb_config.load(None, env)
    assert s.database_url == "mysql://app@db/fleet"
    assert any("DB_HOST=other is not used" in n and "DATABASE_URL" in n
               for n in s.source_notes)


def test_callback_listener_aliases_and_names_not_honoured() -> None:
    s = cb_config.load(None, {"CALLBACK_HOST": "127.0.0.1", "CALLBACK_PORT": "3999",
                              "DEBUG": "true", "ENABLE_CALLBACKS": "true", "PORT": "8000",
                              "SCHEDULE_EXPRESSION": "rate(1 day)"})
    assert (s.http_host, s.http_port) == ("127.0.0.1", 3999)
    warned = " | ".join(s.source_warnings)
    for name, instead in (("DEBUG", "LOG_LEVEL=DEBUG"), ("ENABLE_CALLBACKS", "callback_url"),
                          ("PORT", "CALLBACK_HTTP_PORT"),
                          ("SCHEDULE_EXPRESSION", "PUDU_POLL_SCHEDULE")):
        assert f"{name} is set but not honoured" in warned and instead in warned


def test_seed_credentials_yaml_names_the_secret(tmp_path: Path) -> None:
    creds = tmp_path / "credentials.yaml"
    creds.write_text('database:\n  host: "db.example"\n  secret_name: "prod/pudu"\n'
                     '  region_name: "eu-west-1"\n')
    s = cb_config.load(None, {"CREDENTIALS_FILE": str(creds)})
    assert s.database_url == "mysql://db.example/?secret_name=prod%2Fpudu&region_name=eu-west-1"
    assert (s.database.secret_name, s.database.region_name) == ("prod/pudu", "eu-west-1")
    # the env form wins over the file: DATABASE_SECRET_NAME, and the other seed's name
    s = cb_config.load(None, {"CREDENTIALS_FILE": str(creds),
                              "SECRETS_MANAGER_SECRET_NAME": "other/pudu"})
    assert s.database.secret_name == "other/pudu"
    creds.write_text("database:\n  hostname: x\n")
    with pytest.raises(ConfigError, match="hostname"):
        cb_config.load(None, {"CREDENTIALS_FILE": str(creds)})


@pytest.mark.integration  # connects to the shared MariaDB as a scratch user
def test_a_secret_alone_gives_the_whole_address(aws: SecretsManagerServer) -> None:
    """DATABASE_SECRET_NAME and AWS_REGION only: host, port, database and login are the
    secret's (RDS's own secrets hold them all)."""
    with scratch_mysql_user() as (user, password, url):
        name = _secret(aws, {"username": user, "password": password, "host": "127.0.0.1",
                             "port": 3306, "dbname": url.rsplit("/", 1)[1]})
        s = cb_config.load(None, {"DATABASE_SECRET_NAME": name, "AWS_REGION": REGION})
        assert s.database_url.startswith("mysql:///?secret_name=")
        assert _pings(s.database_url)


def test_a_mysql_url_without_user_or_secret_is_refused() -> None:
    s = cb_config.load(None, {"DATABASE_URL": "mysql://db.example:3306/fleet"})
    with pytest.raises(ConfigError, match="no user"):
        open_store(s.database_url)
    s = cb_config.load(None, {"DB_HOST": "db.example", "DB_NAME": "fleet"})
    with pytest.raises(ConfigError, match="no user"):
        open_store(s.database_url)


async def test_a_secret_that_cannot_be_read_holds_writes(aws: SecretsManagerServer) -> None:
    """An unknown secret is a StoreError (retried, nothing acknowledged), never a crash,
    and what it says names the secret, not a value."""
    s = cb_config.load(None, {"DATABASE_URL": "mysql://127.0.0.1:3306/test",
                              "DATABASE_SECRET_NAME": "no/such/secret", "AWS_REGION": REGION})
    async with open_store(s.database_url) as store:
        with pytest.raises(StoreError, match="no/such/secret"):
            await store.migrate()
        assert not await store.ping()


# --- helpers -------------------------------------------------------------------------

def _pings(url: str) -> bool:
    import asyncio

    async def ping() -> bool:
        async with open_store(url) as store:
            return await store.ping()

    return asyncio.run(ping())
