"""The command lines as an operator meets them: check-config refuses what run would, one
line per problem, exit codes as documented, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.procs import free_port
from tests.support.services import edge_agent

BROKER = "mqtt://127.0.0.1:1883"


def cli(module: str, *args: str, env: dict[str, str], stdin: str = ""
        ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "DATABASE_"))}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=60, env={**base, **env}, input=stdin, check=False)


def edge_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {"PUDU_CALLBACK_CODE": "c", "OUTBOX_PATH": str(tmp / "outbox.db"),
            "EDGE_HTTP_HOST": "127.0.0.1", "EDGE_HTTP_PORT": str(free_port()),
            "EDGE_ADMIN_PORT": str(free_port()), **extra}


def assert_one_line_refusal(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("extra", "needle"), [
    ({"MQTT_URL": "http://foo"}, "MQTT_URL"),
    ({"MQTT_BACKEND": "awsiot"}, "MQTT_BACKEND"),
    ({"MQTT_BACKEND": "memory"}, "MQTT_BACKEND"),  # the in-process broker: tests and demo only
    ({"OUTBOX_PATH": "/etc/hostname/outbox.db"}, "OUTBOX_PATH"),
    ({"OUTBOX_PATH": "/proc/edge-agent/outbox.db"}, "OUTBOX_PATH"),  # root may "write" there
    ({"EDGE_HTTP_PORT": "18765", "EDGE_ADMIN_PORT": "18765"}, "EDGE_ADMIN_PORT"),
])
def test_edge_check_config_and_run_refuse_the_same_settings(
        tmp_path: Path, extra: dict[str, str], needle: str) -> None:
    env = edge_env(tmp_path, **extra)
    assert_one_line_refusal(cli("edge_agent", "check-config", env=env), needle)
    assert_one_line_refusal(cli("edge_agent", "run", env=env), needle)


def test_callback_check_config_migrate_and_run_refuse_a_postgres_url(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "postgres://u@db/x"}
    for command in ("check-config", "migrate", "run"):
        assert_one_line_refusal(cli("callback_server", command, env=env), "DATABASE_URL")


@pytest.mark.parametrize("keys", ["keys: [ {bad: 1} ]\n", "keys: [ {name: a\n"])
def test_callback_check_config_and_run_refuse_a_malformed_keys_file(tmp_path: Path,
                                                                   keys: str) -> None:
    (tmp_path / "keys.yaml").write_text(keys)
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}",
           "API_KEYS_FILE": str(tmp_path / "keys.yaml"),
           "CALLBACK_HTTP_HOST": "127.0.0.1", "CALLBACK_HTTP_PORT": str(free_port())}
    for command in ("check-config", "run"):
        assert_one_line_refusal(cli("callback_server", command, env=env), "API_KEYS_FILE")


def test_callback_check_config_and_run_refuse_the_in_process_broker(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}", "MQTT_BACKEND": "memory",
           "CALLBACK_HTTP_HOST": "127.0.0.1", "CALLBACK_HTTP_PORT": str(free_port())}
    for command in ("check-config", "run"):
        assert_one_line_refusal(cli("callback_server", command, env=env), "MQTT_BACKEND")


@pytest.mark.integration
def test_check_config_connect_tries_the_broker(tmp_path: Path) -> None:
    dead = edge_env(tmp_path, MQTT_URL=f"mqtt://127.0.0.1:{free_port()}",
                    MQTT_RECONNECT_MAX_SECONDS="1")
    assert_one_line_refusal(cli("edge_agent", "check-config", "--connect", env=dead),
                            "no connection")
    live = cli("edge_agent", "check-config", "--connect", env=edge_env(tmp_path))
    assert live.returncode == 0 and json.loads(live.stdout)["pudu_callback_code"] == "********"


def test_check_config_into_head_is_quiet(tmp_path: Path) -> None:
    env = {**os.environ, **edge_env(tmp_path)}
    done = subprocess.run(f"{sys.executable} -m edge_agent check-config | head -n 1",
                          shell=True, capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.stdout.strip() == "{" and done.stderr == ""


def test_migrate_says_what_it_created_and_what_existed(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}"}
    first = cli("callback_server", "migrate", env=env)
    assert first.returncode == 0 and "created table mqtt_message_log" in first.stdout
    second = cli("callback_server", "migrate", env=env)
    assert second.returncode == 0 and "created" not in second.stdout
    assert "table mqtt_message_log existed, up to date" in second.stdout


@pytest.mark.integration
def test_outbox_stats_and_peek_beside_a_running_agent(tmp_path: Path) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing is published: entries stay
    with edge_agent(tmp_path, dead, org="acme") as agent:
        for i in range(3):
            assert httpx.post(agent.url + "/api/pudu/webhook", headers={"CallbackCode":
                              "test-code"}, json={"callback_type": "notifyRobotPower",
                              "data": {"sn": f"R{i}", "power": 50}}).status_code == 200
        stats = cli("edge_agent", "outbox", "stats", env=agent.env)
        peek = cli("edge_agent", "outbox", "peek", "-n", "2", env=agent.env)
        health = agent.health()
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert figures["depth"] == 3 and figures["by_channel"] == {"power": 3}
    assert figures["oldest_age_s"] >= 0 and health["outbox_depth"] == 3
    assert health["outbox_oldest_age_s"] >= 0 and health["drain_estimate_s"] is None
    entries = json.loads(peek.stdout)
    assert [e["payload"]["device"] for e in entries] == ["R0", "R1"]


def _not_an_outbox(path: Path, kind: str) -> None:
    if kind == "empty file":
        path.touch()
    elif kind == "text file":
        path.write_text("not a database\n" * 100)
    elif kind == "directory":
        path.mkdir()
    else:  # another program's SQLite database
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (body TEXT)")
        conn.close()


@pytest.mark.parametrize("kind", ["empty file", "text file", "directory", "other database"])
def test_outbox_stats_and_peek_on_a_bad_outbox_path_say_so_in_one_line(
        tmp_path: Path, kind: str) -> None:
    _not_an_outbox(tmp_path / "outbox.db", kind)
    for command in (["stats"], ["peek", "-n", "3"]):
        done = cli("edge_agent", "outbox", *command, env=edge_env(tmp_path))
        assert_one_line_refusal(done, "OUTBOX_PATH")
        assert done.stdout == ""


def test_usage_errors_exit_2_without_a_traceback() -> None:
    done = cli("edge_agent", "frobnicate", env={})
    assert done.returncode == 2 and "Traceback" not in done.stderr


@pytest.mark.parametrize("module", ["edge_agent", "callback_server"])
def test_version_names_the_build_and_help_is_for_an_operator(module: str) -> None:
    done = cli(module, "--version", env={})
    prog = module.replace("_", "-")
    from bridge.service.version import VERSION

    # A checkout's build is its commit (an installed wheel's: tests/test_install.py).
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert done.returncode == 0 and done.stdout.startswith(f"{prog} {VERSION} (build git {commit}")
    usage = cli(module, "--help", env={})
    assert usage.returncode == 0
    for operator_words in ("examples:", "files (as installed):", "exit status:", "journalctl"):
        assert operator_words in usage.stdout
    assert "maps flags" not in usage.stdout  # the module docstring is for developers


def complete(module: str, line: str) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end) with the generated script."""
    script = cli(module, "completion", "bash", env={})
    assert script.returncode == 0, script.stderr
    words = line.split(" ")
    driver = (script.stdout + f"COMP_WORDS=({' '.join(repr(w) for w in words)}); "
              f"COMP_CWORD={len(words) - 1}; {script.stdout.split('complete -F ')[1].split()[0]}; "
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    done = subprocess.run(["bash", "-c", driver], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return sorted(w for w in done.stdout.splitlines() if w)


def test_bash_completion_offers_subcommands_options_and_choices(tmp_path: Path) -> None:
    assert complete("edge_agent", "edge-agent ou") == ["outbox"]
    assert complete("edge_agent", "edge-agent outbox ") == ["backup", "peek", "stats"]
    assert "--connect" in complete("edge_agent", "edge-agent check-config --")
    assert complete("callback_server", "callback-server keys add --role ") == [
        "admin", "ingest", "operator", "viewer"]
    (tmp_path / "conf.yaml").touch()
    assert complete("edge_agent", f"edge-agent --config {tmp_path}/co") == [
        f"{tmp_path}/conf.yaml"]


@pytest.mark.integration
def test_outbox_backup_beside_a_running_agent_restores(tmp_path: Path) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing is published: entries stay
    copy = tmp_path / "backup" / "outbox-copy.db"
    copy.parent.mkdir()
    with edge_agent(tmp_path, dead, org="acme") as agent:
        for i in range(3):
            assert httpx.post(agent.url + "/api/pudu/webhook", headers={"CallbackCode":
                              "test-code"}, json={"callback_type": "notifyRobotPower",
                              "data": {"sn": f"R{i}", "power": 50}}).status_code == 200
        done = cli("edge_agent", "outbox", "backup", str(copy), env=agent.env)
        again = cli("edge_agent", "outbox", "backup", str(copy), env=agent.env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entries"] == 3
    assert oct(copy.stat().st_mode & 0o777) == "0o600"
    assert_one_line_refusal(again, "exists")  # never overwrites a backup
    restored = cli("edge_agent", "outbox", "stats", env={**agent.env, "OUTBOX_PATH": str(copy)})
    assert json.loads(restored.stdout)["by_channel"] == {"power": 3}


def as_operator(*args: str, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``sudo -u pudu-bridge edge-agent ...``: sudo's bare environment, so neither the
    callback code nor $CREDENTIALS_DIRECTORY (the credentials are root's) is there."""
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={"PATH": os.environ["PATH"], **(env or {})})


@pytest.mark.integration
def test_outbox_commands_as_the_operator_runs_them_need_no_callback_code(
        tmp_path: Path) -> None:
    outbox = tmp_path / "outbox-gw1.db"
    config = tmp_path / "config.yaml"  # the shipped template, edited as docs/install.md says
    template = (Path(__file__).parent.parent / "config.example/edge-agent.yaml").read_text()
    config.write_text(template.replace("example-org", "acme")
                      .replace("example-gateway", "site-7")
                      .replace("/var/lib/edge-agent/outbox.db", str(outbox)))
    copy = tmp_path / "outbox-copy.db"
    with edge_agent(tmp_path, f"mqtt://127.0.0.1:{free_port()}", org="acme") as agent:
        for i in range(2):
            assert httpx.post(agent.url + "/api/pudu/webhook", headers={"CallbackCode":
                              "test-code"}, json={"callback_type": "notifyRobotPower",
                              "data": {"sn": f"R{i}", "power": 50}}).status_code == 200
        stats = as_operator("--config", str(config), "outbox", "stats")
        peek = as_operator("--config", str(config), "outbox", "peek", "-n", "1")
        done = as_operator("--config", str(config), "outbox", "backup", str(copy))
    for ran in (stats, peek, done):
        assert ran.returncode == 0, ran.stderr
    assert json.loads(stats.stdout)["depth"] == 2
    assert [e["payload"]["device"] for e in json.loads(peek.stdout)] == ["R0"]
    assert json.loads(done.stdout)["entries"] == 2
    # OUTBOX_PATH still ranks above the file, as it does for the service.
    restored = as_operator("--config", str(config), "outbox", "stats",
                           env={"OUTBOX_PATH": str(copy)})
    assert json.loads(restored.stdout)["path"] == str(copy)


def test_outbox_commands_refuse_an_outbox_path_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("outbox_path: [1, 2]\n")
    done = as_operator("--config", str(tmp_path / "config.yaml"), "outbox", "stats")
    assert_one_line_refusal(done, "outbox_path")


def test_awsiot_refuses_a_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    from tests.support.tls_certs import CertAuthority

    ca = CertAuthority(tmp_path / "pki", "t")
    one, other = ca.issue("gw-1"), ca.issue("gw-2")
    env = edge_env(tmp_path, MQTT_BACKEND="awsiot", MQTT_URL="mqtts://127.0.0.1:8883",
                   ORG_ID="o", MQTT_CA_FILE=str(ca.cert), MQTT_CERT_FILE=str(one.cert),
                   MQTT_KEY_FILE=str(other.key))
    for command in ("check-config", "run"):  # run used to exit on "Failed to create tls context"
        assert_one_line_refusal(cli("edge_agent", command, env=env), "do not load together")
    matching = cli("edge_agent", "check-config", env={**env, "MQTT_KEY_FILE": str(one.key)})
    assert matching.returncode == 0, matching.stderr


def test_a_key_that_is_not_the_certificates_is_named_by_where_it_came_from(
        tmp_path: Path) -> None:
    from tests.support.tls_certs import CertAuthority

    ca = CertAuthority(tmp_path / "pki", "t")
    one, other = ca.issue("gw-1"), ca.issue("gw-2")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copyfile(other.key, credentials / "mqtt_key")
    env = edge_env(tmp_path, ORG_ID="o", MQTT_BACKEND="awsiot",
                   MQTT_URL="mqtts://127.0.0.1:8883",
                   MQTT_CA_FILE=str(ca.cert), MQTT_CERT_FILE=str(one.cert),
                   CREDENTIALS_DIRECTORY=str(credentials))
    done = cli("edge_agent", "check-config", env=env)
    assert_one_line_refusal(done, "edge-agent: the mqtt_key credential: the certificate")
    assert "MQTT_KEY_FILE" not in done.stderr
    # MQTT_KEY_FILE ranks above the credential: then it is the one named.
    named = cli("edge_agent", "check-config", env={**env, "MQTT_KEY_FILE": str(other.key)})
    assert named.returncode == 1
    assert "edge-agent: MQTT_KEY_FILE: the certificate" in named.stderr


def test_a_missing_api_keys_file_is_an_error_not_a_server_with_no_keys(tmp_path: Path) -> None:
    base = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}",
            "CALLBACK_HTTP_HOST": "127.0.0.1", "CALLBACK_HTTP_PORT": str(free_port())}
    typo = {**base, "API_KEYS_FILE": str(tmp_path / "keys.ymal")}
    for command in ("check-config", "run"):
        assert_one_line_refusal(cli("callback_server", command, env=typo), "does not exist")
    (tmp_path / "keys.d").mkdir()
    directory = {**base, "API_KEYS_FILE": str(tmp_path / "keys.d")}
    assert_one_line_refusal(cli("callback_server", "check-config", env=directory),
                            "API_KEYS_FILE")


def test_the_templates_placeholders_are_refused_with_the_line_to_change(tmp_path: Path) -> None:
    template = Path(__file__).resolve().parents[1] / "config.example/edge-agent.yaml"
    config = tmp_path / "config.yaml"
    config.write_text(template.read_text())
    env = {**edge_env(tmp_path), "PUDU_CALLBACK_CODE": "c" * 32}
    done = cli("edge_agent", "--config", str(config), "check-config", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = template.read_text().splitlines()
    org = next(n for n, line in enumerate(lines, 1) if line.startswith("org_id:"))
    refused = [line for line in done.stderr.splitlines() if "placeholder" in line]
    assert len(refused) == 2, done.stderr
    assert f"{config} line {org}: org_id: example-org" in refused[0]
    assert f"line {org + 1}: gateway_id: example-gateway" in refused[1]
    edited = config.read_text().replace("example-org", "acme").replace("example-gateway", "s9")
    config.write_text(edited)
    assert cli("edge_agent", "--config", str(config), "check-config", env=env).returncode == 0


def sandbox_works() -> bool:
    """Root that can become the units' user: not the mapped root of a user namespace
    (``unshare -r``, as ``make test-unit`` uses for a user), where only uid 0 exists."""
    if os.geteuid() != 0:
        return False
    with open("/proc/self/uid_map") as uid_map:
        if all(int(line.split()[2]) <= 65534 for line in uid_map if line.strip()):
            return False
    done = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    return done.returncode == 0


as_root = pytest.mark.skipif(not sandbox_works(), reason="needs real root and mount namespaces")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may enter (pytest's own are root's, 0700), in /var/tmp."""
    path = Path(tempfile.mkdtemp(prefix="pudu-as-service-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def unit_file(tmp_path: Path, environment: dict[str, str], *extra: str) -> Path:
    """A unit as the shipped one runs: its own user, ProtectSystem=strict, hidden homes
    (not PrivateTmp=, which would hide the test's files under /tmp)."""
    unit = tmp_path / "edge-agent.service"
    words = " ".join(f"{k}={v}" for k, v in environment.items())
    unit.write_text("[Service]\nUser=nobody\nGroup=nogroup\nProtectSystem=strict\n"
                    f"ProtectHome=yes\nEnvironment={words}\n"
                    + "".join(f"{line}\n" for line in extra))
    return unit


@as_root
def test_as_service_refuses_what_root_can_read_but_the_units_user_cannot(
        open_dir: Path) -> None:
    from tests.support.tls_certs import CertAuthority

    ca = CertAuthority(open_dir / "pki", "t")
    pair = ca.issue("gw-1")
    for path in (open_dir / "pki", ca.cert, pair.cert):
        path.chmod(0o755 if path.is_dir() else 0o644)
    pair.key.chmod(0o600)  # root's: the service's user cannot read it
    state = open_dir / "state"
    state.mkdir()
    state.chmod(0o777)
    env = {"PUDU_CALLBACK_CODE": "c", "ORG_ID": "o", "GATEWAY_ID": "g",
           "MQTT_URL": "mqtts://127.0.0.1:8883", "MQTT_CA_FILE": str(ca.cert),
           "MQTT_CERT_FILE": str(pair.cert), "MQTT_KEY_FILE": str(pair.key),
           "OUTBOX_PATH": f"{state}/outbox.db"}
    as_root_passes = cli("edge_agent", "check-config", env=env)
    assert as_root_passes.returncode == 0, as_root_passes.stderr
    unit = unit_file(open_dir, env, f"ReadWritePaths={state}")
    refused = cli("edge_agent", "check-config", "--as-service", "--unit", str(unit), env={})
    assert_one_line_refusal_after_banner(refused, str(pair.key), "not readable")
    assert "checking as nobody" in refused.stderr and "Traceback" not in refused.stderr

    # The same key handed over as the mqtt_key credential: systemd reads it as root.
    without_key = {k: v for k, v in env.items() if k != "MQTT_KEY_FILE"}
    unit = unit_file(open_dir, without_key, f"ReadWritePaths={state}",
                     f"LoadCredential=mqtt_key:{pair.key}")
    passed = cli("edge_agent", "check-config", "--as-service", "--unit", str(unit), env={})
    assert passed.returncode == 0, passed.stderr


@as_root
@pytest.mark.parametrize(("outbox", "why"), [
    ("/root/pudu-outbox.db", "out of this user's reach"),  # ProtectHome=yes hides it
    ("{state}/outbox.db", "not writable"),  # ProtectSystem=strict, not in ReadWritePaths
    ("/tmp/pudu-outbox-{pid}.db", "not writable"),  # strict without PrivateTmp=: /tmp too
])
def test_as_service_refuses_a_path_the_units_sandbox_hides_or_makes_read_only(
        open_dir: Path, outbox: str, why: str) -> None:
    state = open_dir / "state"
    state.mkdir()
    state.chmod(0o777)  # writable by anyone, outside the sandbox
    env = {"PUDU_CALLBACK_CODE": "c", "ORG_ID": "o", "GATEWAY_ID": "g",
           "OUTBOX_PATH": outbox.format(state=state, pid=os.getpid())}
    assert cli("edge_agent", "check-config", env=env).returncode == 0
    unit = unit_file(open_dir, env)
    done = cli("edge_agent", "check-config", "--as-service", "--unit", str(unit), env={})
    assert_one_line_refusal_after_banner(done, "OUTBOX_PATH", why)


def assert_one_line_refusal_after_banner(done: subprocess.CompletedProcess[str],
                                         *needles: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if "checking as" not in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), done.stderr


@as_root
def test_callback_as_service_refuses_a_keys_file_only_root_can_read(open_dir: Path) -> None:
    keys = open_dir / "keys.yaml"
    keys.write_text("keys: []\n")
    keys.chmod(0o600)
    state = open_dir / "state"
    state.mkdir()
    state.chmod(0o777)
    env = {"API_KEYS_FILE": str(keys), "DATABASE_URL": f"sqlite:///{state}/cb.db"}
    unit = open_dir / "callback-server.service"
    unit.write_text(f"[Service]\nUser=nobody\nProtectSystem=strict\nReadWritePaths={state}\n"
                    + "".join(f"Environment={k}={v}\n" for k, v in env.items()))
    done = cli("callback_server", "check-config", "--as-service", "--unit", str(unit), env={})
    assert_one_line_refusal_after_banner(done, "API_KEYS_FILE", "not readable by this user")
    keys.chmod(0o644)
    done = cli("callback_server", "check-config", "--as-service", "--unit", str(unit), env={})
    assert done.returncode == 0, done.stderr
