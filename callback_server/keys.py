"""API keys of the callback server: the YAML file of hashed keys, and the ring that holds them.

The file (``API_KEYS_FILE``)::

    keys:
      - {name: ops, sha256: <hex SHA-256 of the UTF-8 key>, orgs: [acme], role: operator}
      - {name: rule, sha256: ..., orgs: ["*"], role: ingest}

Only hashes are stored, so a leaked file grants nothing. ``KeyRing`` reloads the file on
SIGHUP; a bad file then keeps the keys it had and logs why. ``PROXY_TOKEN`` and
``CALLBACK_TOKEN`` join the ring as an all-org admin and an all-org ingest key, so
deployments from before keys existed keep working.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bridge.errors import ConfigError
from bridge.service.private_files import FILE_MODE, make_private_dir

log = logging.getLogger(__name__)

Role = Literal["viewer", "operator", "ingest", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "ingest", "admin")
ALL_ORGS = "*"


def digest(key: str) -> str:
    """Hex SHA-256 of the UTF-8 key: what the file stores."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: the key's name, the orgs it covers and its role."""

    name: str
    orgs: frozenset[str]
    role: Role

    @property
    def all_orgs(self) -> bool:
        return ALL_ORGS in self.orgs

    def covers(self, org: str | None) -> bool:
        """Whether objects of ``org`` are this key's to see (None: an object of no org)."""
        return self.all_orgs or (org is not None and org in self.orgs)

    def covers_all(self, orgs: Iterable[str]) -> bool:
        """Whether every one of ``orgs`` (a receiver's: ``*`` is every org, present and to
        come) is this key's."""
        return self.all_orgs or all(o != ALL_ORGS and o in self.orgs for o in orgs)


class KeyEntry(BaseModel):
    """One key as the file holds it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@:-]+$")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    orgs: list[str] = Field(min_length=1)
    role: Role

    @field_validator("orgs")
    @classmethod
    def _orgs(cls, orgs: list[str]) -> list[str]:
        if ALL_ORGS in orgs and len(orgs) > 1:
            raise ValueError('"*" covers every org; list it alone')
        if any(not o or "/" in o or "+" in o or "#" in o for o in orgs):
            raise ValueError("an org id is non-empty and has no '/', '+' or '#'")
        return orgs

    def principal(self) -> Principal:
        return Principal(self.name, frozenset(self.orgs), self.role)


class KeysFile(BaseModel):
    """The whole file: names are unique, so ``keys remove --name`` means one key."""

    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = []

    @field_validator("keys")
    @classmethod
    def _unique(cls, keys: list[KeyEntry]) -> list[KeyEntry]:
        names = [k.name for k in keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate key names: {', '.join(dupes)}")
        return keys


def read_file(path: Path) -> KeysFile:
    """The keys in ``path`` (none if it does not exist); ConfigError saying what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return KeysFile()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text) or {}
        return KeysFile.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{path} is not a valid keys file: {_one_line(exc)}") from exc


def _one_line(exc: yaml.YAMLError | ValidationError) -> str:
    """What is wrong, on one line: check-config and run print one line per problem."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg']}"
                         for err in exc.errors())
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        problem = getattr(exc, "problem", None) or "not YAML"
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def write_file(path: Path, keys: KeysFile) -> None:
    """Replace ``path`` atomically with ``keys``: a new file is 0600 whatever the umask;
    one that exists keeps its owner, group and mode (never world-readable), so the
    service that reads it (``make install`` makes it root:pudu-bridge 0640) still can."""
    make_private_dir(path.parent)
    try:
        old: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        old = None
    mode = FILE_MODE if old is None else stat.S_IMODE(old.st_mode) & 0o660
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, old.st_uid, old.st_gid)  # PermissionError unless root: said so
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(keys.model_dump(), f, sort_keys=False)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def add_key(path: Path, name: str, orgs: list[str], role: Role) -> str:
    """Append a new random key to ``path`` and return it: the only time it is shown."""
    current = read_file(path)
    if any(k.name == name for k in current.keys):
        raise ConfigError(f"a key named {name!r} exists already; remove it first")
    key = secrets.token_urlsafe(32)
    try:
        entry = KeyEntry(name=name, sha256=digest(key), orgs=orgs, role=role)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from exc
    write_file(path, KeysFile(keys=[*current.keys, entry]))
    return key


def remove_key(path: Path, name: str) -> bool:
    """Drop the key called ``name``; False if there was none."""
    current = read_file(path)
    kept = [k for k in current.keys if k.name != name]
    if len(kept) == len(current.keys):
        return False
    write_file(path, KeysFile(keys=kept))
    return True


class KeyRing:
    """The keys a running server accepts: the file's, plus the legacy tokens."""

    def __init__(self, path: str | None = None, *, proxy_token: str | None = None,
                 callback_token: str | None = None) -> None:
        self.path = Path(path) if path else None
        self._fixed: list[tuple[bytes, Principal]] = []
        if proxy_token:
            self._fixed.append((digest(proxy_token).encode(),
                                Principal("PROXY_TOKEN", frozenset({ALL_ORGS}), "admin")))
        if callback_token:
            self._fixed.append((digest(callback_token).encode(),
                                Principal("CALLBACK_TOKEN", frozenset({ALL_ORGS}), "ingest")))
        self._loaded: list[tuple[bytes, Principal]] = []
        if self.path is not None:
            self._loaded = self._load(self.path)  # at startup a bad file is fatal

    @staticmethod
    def _load(path: Path) -> list[tuple[bytes, Principal]]:
        return [(k.sha256.lower().encode(), k.principal()) for k in read_file(path).keys]

    def __len__(self) -> int:
        return len(self._fixed) + len(self._loaded)

    def reload(self) -> bool:
        """Read the file again; a bad file keeps the current keys and logs why."""
        if self.path is None:
            return False
        try:
            loaded = self._load(self.path)
        except ConfigError as exc:
            log.error("keeping the %d keys loaded before: %s", len(self._loaded), exc)
            return False
        self._loaded = loaded
        log.info("loaded %d API keys from %s", len(loaded), self.path)
        return True

    def holds(self, principal: Principal) -> bool:
        """Whether a key of this name, orgs and role is still loaded: what outlives one
        request (a console session, a stream) is valid only as long as its key is, so a
        key removed or changed (SIGHUP) ends them too."""
        return any(p == principal for _, p in (*self._fixed, *self._loaded))

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key``, or None; every hash is compared, in constant time."""
        given = digest(key).encode()
        found: Principal | None = None
        for stored, principal in (*self._fixed, *self._loaded):
            if hmac.compare_digest(given, stored) and found is None:
                found = principal
        return found
