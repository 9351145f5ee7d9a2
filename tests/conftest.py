"""Shared fixtures: real processes, started per test and stopped by PID."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dbutil import scratch_mysql_database
from tests.support.procs import MosquittoProcess, free_port, port_open
from tests.support.secrets_manager import SecretsManagerServer
from tests.support.tls_certs import CertAuthority, Pki, TlsBroker

SHARED_BROKER = ("127.0.0.1", 1883)
MARIADB = ("127.0.0.1", 3306)
HINT = "start it (see docs/design-contracts.md, 'Real components') or run `bash .ci/run`"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private broker with persistence on a free port, for tests that stop or kill it."""
    with MosquittoProcess(tmp_path / "mosquitto", persistence=True) as broker:
        yield broker


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Throwaway CAs: what a gateway's AWS IoT certificate set looks like, and an intruder."""
    d = tmp_path_factory.mktemp("pki")
    trusted, rogue = CertAuthority(d, "trusted"), CertAuthority(d, "rogue")
    return Pki(trusted, rogue, trusted.issue("gw-tls"), rogue.issue("intruder"))


@pytest.fixture(scope="session")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """Mosquitto requiring client certificates from the trusted CA (like AWS IoT Core)."""
    server = pki.trusted.issue("broker", server=True)
    plain = free_port()
    proc = MosquittoProcess(tmp_path_factory.mktemp("tls-broker"), extra=[
        f"cafile {pki.trusted.cert}", f"certfile {server.cert}", f"keyfile {server.key}",
        "require_certificate true",
        f"listener {plain} 127.0.0.1",
    ]).start()
    try:
        yield TlsBroker(f"mqtts://127.0.0.1:{proc.port}", f"mqtt://127.0.0.1:{plain}", proc.port)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def shared_broker_url() -> str:
    """The machine's Mosquitto; fails (never skips) when it is not there."""
    if not port_open(*SHARED_BROKER):
        pytest.fail(f"no MQTT broker on {SHARED_BROKER[0]}:{SHARED_BROKER[1]}: {HINT}",
                    pytrace=False)
    return "mqtt://{}:{}".format(*SHARED_BROKER)


@pytest.fixture(scope="session")
def mariadb_url() -> str:
    """The machine's MariaDB (root, empty password, database ``test``); fails when absent."""
    import pymysql  # aiomysql's own driver; a plain login here gives the clearest error

    host, port = MARIADB
    if not port_open(host, port):
        pytest.fail(f"no MariaDB on {host}:{port}: {HINT}", pytrace=False)
    try:
        pymysql.connect(host=host, port=port, user="root", password="", database="test",
                        connect_timeout=5, ssl_disabled=True).close()
    except pymysql.MySQLError as exc:
        pytest.fail(f"MariaDB on {host}:{port} refused root@test with an empty password "
                    f"({exc}): {HINT}", pytrace=False)
    return f"mysql://root:@{host}:{port}/test"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the disk-full tests (mounting needs root), unmounted in
    teardown (lazily, should a process still hold it)."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def unique_id() -> str:
    """Eight random hex digits, for topics, org ids and client ids no other test uses."""
    return uuid.uuid4().hex[:8]


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database of each kind: a SQLite file, and a scratch MariaDB database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'callback.db'}"
    else:
        with scratch_mysql_database() as url:
            yield url


# moto as AWS Secrets Manager: one server per test module that asks for it

@pytest.fixture(scope="module")
def sm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretsManagerServer]:
    with SecretsManagerServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def aws(sm: SecretsManagerServer, monkeypatch: pytest.MonkeyPatch) -> SecretsManagerServer:
    """boto3 in this process talks to the moto server (it reads os.environ itself)."""
    for name, value in sm.env.items():
        monkeypatch.setenv(name, value)
    return sm
