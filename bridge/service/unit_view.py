"""``check-config --as-service``: the checks run as the systemd unit will run the service.

Run as root, ``check-config`` passes what the service's user is refused: a root-only key
file, a database path that ``ProtectSystem=strict`` makes read-only or ``ProtectHome=``
hides. Here the unit file (and its drop-ins) is read; in a child process, in a private
mount namespace, its sandbox is laid over the file system (read-only system, hidden
homes, private /tmp, its writable paths), its credentials are handed over the way
systemd does (read by root, ``$CREDENTIALS_DIRECTORY`` readable by the user only), its
``Environment=``/``EnvironmentFile=`` become the whole environment, the user and group
are taken, and only then are the settings loaded and checked.

Linux only, as root (util-linux's ``mount``; no systemd needed, so it works in a
container and before the first start too).
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bridge.errors import ConfigError

__all__ = ["UNIT_DIRS", "UnitView", "find_unit", "read_unit", "run_in_unit"]

#: Where systemd looks for a system unit, first match wins (drop-ins from all of them).
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
_CLONE_NEWNS = 0x00020000
_API_FS = ("/proc", "/sys", "/dev")
_PRELOAD = ("bridge.transport.paho", "bridge.transport.crt",
            "bridge.transport.awsiot", "awscrt.io", "ssl",
            "sqlite3", "encodings.idna", "uuid", "logging.handlers")


@dataclass
class UnitView:
    """What of a unit decides what its service can see, read and write."""

    path: Path
    user: str = "root"
    group: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    environment_files: list[str] = field(default_factory=list)
    credentials: dict[str, str] = field(default_factory=dict)
    protect_system: str = "no"
    protect_home: str = "no"
    private_tmp: bool = False
    read_write: list[str] = field(default_factory=list)
    inaccessible: list[str] = field(default_factory=list)
    state_directories: list[str] = field(default_factory=list)
    working_directory: str | None = None

    @property
    def name(self) -> str:
        return self.path.name


def find_unit(name: str, dirs: tuple[str, ...] = UNIT_DIRS) -> Path:
    """The unit file systemd would load for ``name`` (``edge-agent.service``)."""
    for directory in dirs:
        path = Path(directory) / name
        if path.is_file():
            return path
    raise ConfigError(f"{name} is not installed in {', '.join(dirs)} (give --unit FILE)")


def _assignments(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; continuation lines joined, comments skipped."""
    out: list[tuple[str, str, str]] = []
    section, pending = "", ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line:
            key, _, value = line.partition("=")
            out.append((section, key.strip(), value.strip()))
    return out


def read_unit(path: Path) -> UnitView:
    """The unit and its drop-ins (``NAME.service.d/*.conf`` in every unit directory, in
    file-name order), as systemd merges them: a later value wins, an empty one resets a
    list."""
    view = UnitView(path)
    drop_ins = sorted((p for d in UNIT_DIRS for p in Path(d, path.name + ".d").glob("*.conf")),
                      key=lambda p: p.name)
    for source in (path, *drop_ins):
        for section, key, value in _assignments(source):
            if section == "Service":
                _apply(view, key, value)
    return view


def _apply(view: UnitView, key: str, value: str) -> None:
    lists = {"ReadWritePaths": view.read_write, "InaccessiblePaths": view.inaccessible,
             "StateDirectory": view.state_directories,
             "EnvironmentFile": view.environment_files}
    if key in lists:
        if not value:
            lists[key].clear()
        else:
            lists[key].extend(value.split() if key != "EnvironmentFile" else [value])
    elif key == "User":
        view.user = value
    elif key == "Group":
        view.group = value or None
    elif key == "Environment":
        if not value:
            view.environment.clear()
        for word in shlex.split(value):
            name, _, val = word.partition("=")
            view.environment[name] = val
    elif key == "LoadCredential":
        name, _, source = value.partition(":")
        view.credentials[name] = source
    elif key == "ProtectSystem":
        view.protect_system = {"true": "yes", "1": "yes", "false": "no", "0": "no"}.get(
            value, value)
    elif key == "ProtectHome":
        view.protect_home = {"true": "yes", "1": "yes", "false": "no", "0": "no"}.get(
            value, value)
    elif key == "PrivateTmp":
        view.private_tmp = value in ("yes", "true", "1", "on")
    elif key == "WorkingDirectory":
        view.working_directory = value.lstrip("-") or None


def _env_file(path: str) -> dict[str, str]:
    """``EnvironmentFile=`` (``-`` first: may be absent): KEY=VALUE lines, quotes removed."""
    optional = path.startswith("-")
    file = Path(path.lstrip("-"))
    if not file.exists():
        if optional:
            return {}
        raise ConfigError(f"EnvironmentFile={file} does not exist: systemd refuses to start")
    out: dict[str, str] = {}
    for line in file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        words = shlex.split(value) if value.strip() else [""]
        out[key.strip()] = " ".join(words)
    return out


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if not any(point == api or point.startswith(api + "/") for api in _API_FS):
            points.append(point)
    return points


def _private_namespace() -> None:
    """This process's own mount namespace: nothing mounted from here on is seen outside."""
    if ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWNS) != 0:
        raise ConfigError(f"cannot make a private mount namespace: "
                          f"{os.strerror(ctypes.get_errno())}")
    _mount("--make-rprivate", "/")


def _sandbox(view: UnitView, uid: int, gid: int) -> None:
    """Lay the unit's file-system view over this process's private mount namespace."""
    for state in view.state_directories:  # systemd makes them, owned by the user
        directory = Path("/var/lib", state)
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
            os.chown(directory, uid, gid)
    read_only: list[str] = []
    if view.protect_system == "strict":
        read_only = _mount_points()
    elif view.protect_system in ("yes", "full"):
        read_only = ["/usr", "/boot", "/efi"] + (["/etc"] if view.protect_system == "full"
                                                else [])
    for point in read_only:
        if Path(point).is_dir():
            if point not in _mount_points():
                _mount("--bind", point, point)
            _mount("-o", "remount,bind,ro", point)
    homes = [h for h in ("/home", "/root", "/run/user") if Path(h).is_dir()]
    if view.protect_home in ("yes", "tmpfs"):
        for home in homes:
            _mount("-t", "tmpfs", "-o", "mode=000" if view.protect_home == "yes" else "mode=755",
                   "tmpfs", home)
    elif view.protect_home == "read-only":
        for home in homes:
            _mount("--bind", home, home)
            _mount("-o", "remount,bind,ro", home)
    if view.private_tmp:
        for tmp in ("/tmp", "/var/tmp"):
            _mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", tmp)
    for path in [*view.read_write, *(f"/var/lib/{s}" for s in view.state_directories)]:
        path = path.lstrip("-")
        if Path(path).exists():
            _mount("--bind", path, path)
            _mount("-o", "remount,bind,rw", path)
    for path in view.inaccessible:
        path = path.lstrip("-")
        if Path(path).is_dir():
            _mount("-t", "tmpfs", "-o", "mode=000", "tmpfs", path)


def _read_credentials(view: UnitView) -> dict[str, bytes]:
    """Each LoadCredential= source, read as root (as systemd does, before the sandbox)."""
    contents: dict[str, bytes] = {}
    for name, source in view.credentials.items():
        try:
            contents[name] = Path(source).read_bytes()
        except OSError as exc:
            raise ConfigError(f"LoadCredential={name}:{source}: {exc.strerror or exc}: "
                              "systemd refuses to start the unit") from exc
    return contents


def _place_credentials(view: UnitView, contents: dict[str, bytes], uid: int, gid: int
                       ) -> dict[str, str]:
    """The credentials in a tmpfs only the user can read; the variable that names it."""
    if not contents:
        return {}
    directory = Path("/run/credentials", view.name)
    directory.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", "mode=0500", "tmpfs", str(directory))
    for name, data in contents.items():
        file = directory / name
        file.write_bytes(data)
        os.chown(file, uid, gid)
        file.chmod(0o400)
    os.chown(directory, uid, gid)
    return {"CREDENTIALS_DIRECTORY": str(directory)}


def run_in_unit(view: UnitView, check: Callable[[], int], preload: tuple[str, ...] = ()
                ) -> int:
    """``check()`` in a child as the unit's user in its sandbox; its exit code.
    ``preload``: modules the checks import lazily, imported first (as root)."""
    if os.geteuid() != 0:
        raise ConfigError("--as-service needs root (it reads the credentials and takes the "
                          "unit's user, as systemd does)")
    try:
        account = pwd.getpwnam(view.user)
        gid = grp.getgrnam(view.group).gr_gid if view.group else account.pw_gid
    except KeyError as exc:
        raise ConfigError(f"{view.name}: User={view.user} / Group={view.group}: no such "
                          "account (the package or `make install` creates pudu-bridge)") from exc
    environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "LANG": os.environ.get("LANG", "C.UTF-8"), "USER": account.pw_name,
                   "LOGNAME": account.pw_name, "HOME": account.pw_dir,
                   "SHELL": account.pw_shell}
    for file in view.environment_files:
        environment.update(_env_file(file))
    environment.update(view.environment)
    for module in (*_PRELOAD, *preload):  # the user may not read root's interpreter
        with contextlib.suppress(ImportError):
            __import__(module)
    sys.stdout.flush()
    sys.stderr.flush()
    credentials = Path("/run/credentials", view.name)
    made = [p for p in (credentials.parent, credentials) if not p.exists()]
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            _private_namespace()
            # In this namespace only: a tmpfs on /run/credentials/NAME (systemd's place),
            # filled before the sandbox makes /run read-only.
            environment.update(_place_credentials(view, _read_credentials(view),
                                                  account.pw_uid, gid))
            _sandbox(view, account.pw_uid, gid)
            os.initgroups(account.pw_name, gid)
            os.setgid(gid)
            os.setuid(account.pw_uid)
            os.environ.clear()
            os.environ.update(environment)
            if view.working_directory:
                try:
                    os.chdir(view.working_directory)
                except OSError as exc:
                    raise ConfigError(f"WorkingDirectory={view.working_directory}: "
                                      f"{exc.strerror or exc}") from exc
            code = check()
        except ConfigError as exc:
            print(f"{view.name}: {exc}", file=sys.stderr)
        except BaseException as exc:  # a child must never run on into the parent's code
            print(f"{view.name}: check failed: {exc!r}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    for directory in reversed(made):  # the child's tmpfs went with its namespace
        with contextlib.suppress(OSError):
            directory.rmdir()
    return os.waitstatus_to_exitcode(status)
