"""`make install` on a staging root: from a wheelhouse with no index, twice (the second
changes nothing), units that systemd accepts, config never overwritten; an aarch64
wheelhouse for a gateway resolves to binary wheels. It heals: a venv whose interpreter
is gone or changed, or that is half-made or broken, is rebuilt; the newest of two builds
in a wheelhouse is installed; missing prerequisites are said in one line."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import pins
from tests.support.procs import free_port
from tests.support.services import edge_agent

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
NO_INDEX = {"PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_EXTRA_INDEX_URL": "",
            "PIP_FIND_LINKS": "", "PIP_NO_INDEX": "1"}


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time from this checkout (install.sh empties ./build): the .deb tests
    (tests/test_deb.py) take the same lock."""
    with open("/tmp/pudu-fleet-bridge-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def make(*args: str, env: dict[str, str] | None = None, python: str = sys.executable
         ) -> subprocess.CompletedProcess[str]:
    with build_lock():
        return subprocess.run(["make", "-s", "-C", str(ROOT), *args, f"PY={python}"],
                              env={**os.environ, **(env or {})}, capture_output=True,
                              text=True, timeout=300, check=False)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and mode, and every directory's mode (byte-code aside)."""
    out: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if "__pycache__" in rel or rel.endswith(".pyc"):
            continue
        st = path.lstat()
        if path.is_symlink():
            out[rel] = (os.readlink(path), st.st_mode)
        elif path.is_file():
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode)
        else:
            out[rel] = ("dir", st.st_mode)
    return out


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    house = tmp_path_factory.mktemp("wheelhouse")
    done = make("wheelhouse", f"WHEELHOUSE={house}")
    assert done.returncode == 0, done.stderr[-2000:]
    return house


def test_install_from_a_wheelhouse_twice_changes_nothing(wheelhouse: Path,
                                                          tmp_path: Path) -> None:
    dest = tmp_path / "root"
    first = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}", env=NO_INDEX)
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(dest)
    config = dest / "etc/edge-agent/config.yaml"
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    assert oct((dest / "etc/edge-agent/credentials").stat().st_mode & 0o777) == "0o700"
    code = dest / "etc/edge-agent/credentials/pudu_callback_code"  # LoadCredential= needs it
    assert code.stat().st_size == 0 and oct(code.stat().st_mode & 0o777) == "0o600"
    venv = dest / "opt/pudu-fleet-bridge/.venv"
    assert (venv / "bin/edge-agent").read_text().startswith("#!/opt/pudu-fleet-bridge/.venv/")
    # Vendor units below /etc: the admin's edits and drop-ins there are never written.
    assert (dest / "usr/local/lib/systemd/system/edge-agent.service").is_file()
    assert "Environment=CALLBACK_REPLICA=%i" in (
        dest / "usr/local/lib/systemd/system/callback-server@.service").read_text()
    assert not (dest / "etc/systemd/system").exists()
    # The keys file: made empty, named by the new config, and `keys add` (as root, as
    # docs/callback-server.md says) keeps its group and mode, so the service's group can
    # still read it.
    keys = dest / "etc/callback-server/keys.yaml"
    assert oct(keys.stat().st_mode & 0o777) == "0o640" and keys.read_text() == "keys: []\n"
    assert "api_keys_file: /etc/callback-server/keys.yaml " in (
        dest / "etc/callback-server/config.yaml").read_text()
    group = 4242 if os.geteuid() == 0 else os.getegid()
    os.chown(keys, os.geteuid(), group)  # as apply_live's chgrp pudu-bridge on a live root
    added = subprocess.run([str(venv / "bin/python"), "-m", "callback_server", "keys",
                            "--file", str(keys), "add", "--name", "ops", "--org", "acme",
                            "--role", "viewer"],
                           capture_output=True, text=True, check=False)
    assert added.returncode == 0 and len(added.stdout.strip()) >= 32, added.stderr
    st = keys.stat()
    assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o640", group) and "ops" in keys.read_text()
    os.chown(keys, os.geteuid(), os.getegid())
    keys.write_text("keys: []\n")  # back as installed, for the no-op check below
    imported = subprocess.run([str(venv / "bin/python"), "-c",
                               "import edge_agent.cli, callback_server.cli, awscrt, orjson"],
                              capture_output=True, text=True, check=False)
    assert imported.returncode == 0, imported.stderr

    second = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}", env=NO_INDEX)
    assert second.returncode == 0, second.stderr[-2000:]
    assert snapshot(dest) == before
    assert "wrote" not in second.stderr

    config.write_text("# the operator's own\n")
    third = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}", env=NO_INDEX)
    assert third.returncode == 0 and config.read_text() == "# the operator's own\n"

    removed = make("uninstall", f"DESTDIR={dest}")
    assert removed.returncode == 0, removed.stderr
    assert not venv.exists()
    assert not (dest / "usr/local/lib/systemd/system/edge-agent.service").exists()
    assert not (dest / "usr/local/lib/systemd/system/callback-server@.service").exists()
    assert config.exists()  # config (and data) are kept


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_installed_units(wheelhouse: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    assert make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}",
                env=NO_INDEX).returncode == 0
    # The staging root needs the distribution's own units (sysinit.target, ...) to verify ours.
    shutil.copytree("/lib/systemd/system", dest / "usr/lib/systemd/system", symlinks=True,
                    dirs_exist_ok=True)
    (dest / "bin").mkdir(exist_ok=True)
    shutil.copy2("/bin/kill", dest / "bin/kill")  # ExecReload= names it
    units = [str(dest / f"usr/local/lib/systemd/system/{s}.service")
             for s in ("edge-agent", "callback-server")]
    # the replicas' template, as its instance callback-server@2 (a link names the instance)
    instance = tmp_path / "callback-server@2.service"
    instance.symlink_to(dest / "usr/local/lib/systemd/system/callback-server@.service")
    units.append(str(instance))
    done = subprocess.run(["systemd-analyze", "verify", f"--root={dest}", *units],
                          capture_output=True, text=True, timeout=60, check=False)
    ours = [line for line in (done.stdout + done.stderr).splitlines()
            if "edge-agent" in line or "callback-server" in line]
    assert done.returncode == 0 and ours == [], done.stderr


@pytest.fixture(scope="session")
def aarch64_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An arm64 gateway's wheelhouse (also what tests/test_deb.py packages for arm64)."""
    house = tmp_path_factory.mktemp("aarch64")
    done = make("wheelhouse", f"WHEELHOUSE={house}", "PLATFORM=manylinux2014_aarch64",
                "PYVER=3.11")
    assert done.returncode == 0, done.stderr[-2000:]
    return house


def test_an_aarch64_gateway_wheelhouse_resolves(aarch64_wheelhouse: Path) -> None:
    names = [p.name for p in aarch64_wheelhouse.iterdir()]
    for binary in ("awscrt", "uvloop", "httptools", "pydantic_core", "orjson"):
        wheel = next((n for n in names if n.startswith(binary + "-")), None)
        assert wheel is not None and "aarch64" in wheel, (binary, names)


def test_a_wheelhouse_holds_the_pinned_versions_and_nothing_else(
        wheelhouse: Path, aarch64_wheelhouse: Path, tmp_path: Path) -> None:
    for house in (wheelhouse, aarch64_wheelhouse):
        found = pins.in_wheelhouse(house)
        assert {"awscrt", "fastapi", "paho-mqtt"} <= found.keys(), sorted(found)
        assert pins.off_pin(found) == {}, house
    # the pins are what is asked for, not merely what the index has newest: one the index
    # lacks stops the build, by name
    edited = tmp_path / "constraints.txt"
    edited.write_text(re.sub(r"(?m)^croniter==.*$", "croniter==0.0.1",
                             pins.CONSTRAINTS.read_text()))
    done = make("wheelhouse", f"WHEELHOUSE={tmp_path / 'house'}", f"CONSTRAINTS={edited}")
    assert done.returncode != 0 and "croniter==0.0.1" in done.stderr, done.stderr[-2000:]


def test_a_platform_without_wheels_is_named_before_the_gateway_compiles(
        tmp_path: Path) -> None:
    done = make("wheelhouse", f"WHEELHOUSE={tmp_path / 'armhf'}", "PLATFORM=linux_armv7l",
                "PYVER=3.11")
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if "has no wheel for linux_armv7l" in line]
    assert len(said) == 1 and "would have to compile" in said[0], done.stderr[-2000:]


def test_make_takes_python_as_the_gateway_version_or_the_interpreter() -> None:
    def planned(*args: str) -> str:
        done = subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True,
                              text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    aarch64 = planned("wheelhouse", "WHEELHOUSE=wh", "PLATFORM=manylinux2014_aarch64",
                      "PYTHON=3.11")  # the spelling issue 11 asked for
    assert 'PYVER="3.11"' in aarch64 and 'PYTHON="python3"' in aarch64
    assert 'PYTHON="python3.11"' in planned("install", "PYTHON=python3.11")


def venv_python(dest: Path) -> Path:
    return dest / "opt/pudu-fleet-bridge/.venv/bin/python"


def installed_version(dest: Path) -> str:
    """``edge-agent --version`` of the staged venv, run away from the checkout."""
    done = subprocess.run([str(venv_python(dest)), "-c", "import sys; from edge_agent.cli "
                           "import main; sys.exit(main(['--version']))"], cwd=dest,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_venv_whose_interpreter_changed_or_went_is_rebuilt_and_the_service_starts(
        wheelhouse: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    python = bindir / "python3"  # the interpreter the gateway's python3 points at
    python.symlink_to(os.path.realpath(sys.executable))
    first = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}", env=NO_INDEX,
                 python=str(python))
    assert first.returncode == 0, first.stderr[-2000:]

    # Debian 12 -> 13: python3 re-pointed at another minor version; the venv was made for
    # the old one (its site-packages are python3.X's).
    cfg = venv_python(dest).parent.parent / "pyvenv.cfg"
    cfg.write_text(re.sub(r"(?m)^version\s*=.*$", "version = 3.10.13", cfg.read_text()))
    changed = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}", env=NO_INDEX,
                   python=str(python))
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "rebuilding the venv" in changed.stderr and "made for Python 3.10" in changed.stderr

    # The interpreter is gone (the old python3.X package removed): rebuilt with the new one.
    python.unlink()
    gone = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}", env=NO_INDEX,
                python=os.path.realpath(sys.executable))
    assert gone.returncode == 0, gone.stderr[-2000:]
    assert "its interpreter is gone" in gone.stderr

    # A dependency removed by hand: pip check fails, the venv is rebuilt.
    subprocess.run([str(venv_python(dest)), "-m", "pip", "uninstall", "-q", "-y", "orjson"],
                   check=True, capture_output=True)
    broken = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}", env=NO_INDEX,
                  python=os.path.realpath(sys.executable))
    assert broken.returncode == 0 and "pip check" in broken.stderr, broken.stderr[-2000:]

    service = edge_agent(tmp_path, f"mqtt://127.0.0.1:{free_port()}", org="acme")
    service.command = [str(venv_python(dest)), "-m", "edge_agent"]
    service.cwd = dest  # not the checkout: the installed packages must be the ones running
    with service:  # __enter__ starts it (a second start() orphaned the first process)
        assert service.health()["status"] in ("healthy", "degraded")


def test_a_half_made_venv_is_replaced(wheelhouse: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    venv = dest / "opt/pudu-fleet-bridge/.venv"
    # What `python3 -m venv` leaves without python3-venv: an interpreter and no pip.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    done = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}", env=NO_INDEX)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "half-made" in done.stderr
    assert installed_version(dest).startswith("edge-agent 0.1.0 (build wheel ")


def test_missing_prerequisites_are_said_in_one_line_before_anything_is_written(
        tmp_path: Path) -> None:
    # An interpreter without the venv module (Debian's python3 without python3-venv).
    shadow = tmp_path / "shadow"
    (shadow / "ensurepip").mkdir(parents=True)
    (shadow / "ensurepip/__init__.py").write_text("raise ImportError('no ensurepip')\n")
    python = tmp_path / "python3"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={shadow} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    dest = tmp_path / "root"
    done = make("install", f"DESTDIR={dest}", "WHEELHOUSE=/nonexistent", env=NO_INDEX,
                python=str(python))
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("install:")]
    assert len(said) == 1 and "python3-venv" in said[0] and "apt-get install" in said[0], said
    assert not dest.exists()


def rebuilt_with_version(wheel: Path, version: str, out: Path) -> Path:
    """The same wheel as another version (name, METADATA and RECORD agree, as pip checks)."""
    import base64
    import zipfile

    old = wheel.name.split("-")[1]
    target = out / wheel.name.replace(f"-{old}-", f"-{version}-")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w") as dst:
        record: list[str] = []
        for info in src.infolist():
            name = info.filename.replace(f"-{old}.dist-info", f"-{version}.dist-info")
            if name.endswith("/RECORD"):
                record_name = name
                continue
            data = src.read(info)
            if name.endswith("/METADATA"):
                data = data.replace(f"Version: {old}\n".encode(), f"Version: {version}\n".encode())
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(data)}")
            dst.writestr(name, data)
        dst.writestr(record_name, "\n".join([*record, f"{record_name},,"]) + "\n")
    return target


def test_of_two_builds_in_a_wheelhouse_the_newest_is_installed(
        wheelhouse: Path, tmp_path: Path) -> None:
    house = tmp_path / "house"
    shutil.copytree(wheelhouse, house)
    ours = next(house.glob("pudu_fleet_bridge-0.1.0-*.whl"))
    # 0.10.0 sorts before 0.9.0 by name, and 0.1.0 before both.
    rebuilt_with_version(ours, "0.9.0", house)
    rebuilt_with_version(ours, "0.10.0", house)
    dest = tmp_path / "root"
    done = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={house}", env=NO_INDEX)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 builds: installing pudu_fleet_bridge-0.10.0" in done.stderr
    assert installed_version(dest).startswith("edge-agent 0.10.0 (build wheel ")


def test_an_admins_drop_in_survives_and_an_old_unedited_etc_unit_is_retired(
        wheelhouse: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    etc_units = dest / "etc/systemd/system"
    etc_units.mkdir(parents=True)
    # An install from before: its unedited unit in /etc, and one the admin edited.
    shutil.copy(ROOT / "systemd/edge-agent.service", etc_units / "edge-agent.service")
    edited = etc_units / "callback-server.service"
    edited.write_text((ROOT / "systemd/callback-server.service").read_text() + "# mine\n")
    drop_in = etc_units / "edge-agent.service.d/override.conf"
    drop_in.parent.mkdir()
    drop_in.write_text("[Service]\nEnvironment=LOG_LEVEL=DEBUG\n")
    for _ in range(2):
        done = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}", env=NO_INDEX)
        assert done.returncode == 0, done.stderr[-2000:]
    assert not (etc_units / "edge-agent.service").exists()
    assert edited.read_text().endswith("# mine\n")
    assert "systemctl edit callback-server" in done.stderr
    assert drop_in.read_text() == "[Service]\nEnvironment=LOG_LEVEL=DEBUG\n"


def test_without_the_awsiot_extra_a_paho_gateway_runs_and_awsiot_is_refused(
        wheelhouse: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    done = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}",
                env={**NO_INDEX, "EXTRAS": ""})  # e.g. 32-bit ARM, where awscrt has no wheel
    assert done.returncode == 0, done.stderr[-2000:]

    def check(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(venv_python(dest)), "-m", "edge_agent", "check-config"], cwd=dest,
            env={**os.environ, "PUDU_CALLBACK_CODE": "c", "ORG_ID": "o", "GATEWAY_ID": "g",
                 "OUTBOX_PATH": str(tmp_path / "outbox.db"), **env},
            capture_output=True, text=True, timeout=60, check=False)

    assert subprocess.run([str(venv_python(dest)), "-c", "import awscrt"],
                          capture_output=True, check=False).returncode != 0
    assert check().returncode == 0  # paho: awscrt is never needed
    refused = check(MQTT_BACKEND="awsiot", MQTT_URL="mqtts://127.0.0.1:8883")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1 and "awsiot extra" in lines[0], lines

    # The same build again with the extra: installed, not "already has this build".
    again = make("install", f"DESTDIR={dest}", f"WHEELHOUSE={wheelhouse}",
                 env={**NO_INDEX, "EXTRAS": "awsiot"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already has this build" not in again.stderr
    assert subprocess.run([str(venv_python(dest)), "-c", "import awscrt"],
                          capture_output=True, check=False).returncode == 0
