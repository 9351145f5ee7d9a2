"""Where each setting comes from, and the one order the sources rank in.

Highest first (docs/settings.md keeps the same table):

    ENV         the product's environment name        EDGE_HTTP_PORT, DATABASE_URL
    ALIAS       a replaced system's (seed's) env name  PORT, DB_HOST, SECRETS_MANAGER_SECRET_NAME
    CREDENTIAL  a systemd credential                   $CREDENTIALS_DIRECTORY/mqtt_key
    SECRET      AWS Secrets Manager                    the JSON object a secret name points at
    FILE        config.yaml, credentials.yaml          --config, CREDENTIALS_FILE

A value from a lower source never wins over a higher one, and never silently: every
time two sources give one setting, and every seed name used or not honoured, becomes
a note that ``check-config`` prints and ``run`` logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any


class Source(IntEnum):
    """A kind of source; a higher value wins."""

    FILE = 0
    SECRET = 1
    CREDENTIAL = 2
    ALIAS = 3
    ENV = 4


@dataclass(frozen=True)
class Origin:
    """Where one value came from: its kind and a name an operator recognises."""

    source: Source
    name: str


@dataclass(frozen=True)
class Alias:
    """A seed's environment name for one of our settings (``product`` is our name)."""

    setting: str
    product: str


@dataclass
class Layers:
    """The raw settings, filled from the lowest source up, with each value's origin.

    Values are dotted setting names (``tls.key_file``) set into a nested mapping that
    the service's pydantic model then validates.
    """

    raw: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, Origin] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def file(self, loaded: Mapping[str, Any], name: str, known: Iterable[str]) -> None:
        """Merge a YAML file; ``known`` dotted settings present in it get it as origin."""
        _merge(self.raw, loaded)
        for dotted in known:
            if dotted not in self.origin and has(loaded, dotted):
                self.origin[dotted] = Origin(Source.FILE, name)

    def put(self, dotted: str, value: Any, origin: Origin) -> None:
        """Set ``dotted`` from ``origin`` unless a higher source already did; say which won."""
        before = self.origin.get(dotted)
        if before is not None and before.source > origin.source:
            self.notes.append(f"{dotted}: {origin.name} is not used, {before.name} "
                              f"ranks higher")
            return
        if before is not None and before != origin:
            self.notes.append(f"{dotted}: {origin.name} wins over {before.name}")
        set_dotted(self.raw, dotted, value)
        self.origin[dotted] = origin

    def rank(self, dotted: str) -> Source | None:
        """The kind of source ``dotted`` came from (None: not set anywhere)."""
        found = self.origin.get(dotted)
        return None if found is None else found.source


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """``raw["a"]["b"] = value`` for ``"a.b"``, making the parents."""
    target = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        nested = target.get(part)
        if not isinstance(nested, dict):
            nested = target[part] = {}
        target = nested
    target[leaf] = value


def has(raw: Mapping[str, Any], dotted: str) -> bool:
    """Whether ``dotted`` holds a non-empty value in ``raw``."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) in (None, ""):
            return False
        node = node[part]
    return True


def pop_dotted(raw: dict[str, Any], dotted: str) -> Any:
    """Remove and return ``dotted`` (None if absent); an emptied parent stays."""
    node: Any = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node.pop(leaf, None) if isinstance(node, dict) else None


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def aliases(layers: Layers, names: Mapping[str, Alias], env: Mapping[str, str]) -> None:
    """Apply the seed names that are set; each used one is named, and one shadowed by the
    product's own name (set too) is named with the name that won."""
    for var, alias in names.items():
        value = env.get(var)
        if not value:
            continue
        if env.get(alias.product):
            layers.notes.append(f"{var}={_shown(var, value)} is not used: the product's name "
                                f"{alias.product} is set too and wins")
            continue
        layers.notes.append(f"{var} (a seed name) used for {alias.setting}; the product's "
                            f"name is {alias.product}")
        layers.put(alias.setting, value, Origin(Source.ALIAS, var))


def _shown(var: str, value: str) -> str:
    secret = any(word in var for word in ("PASSWORD", "SECRET", "TOKEN", "KEY", "CODE"))
    return "********" if secret else value


#: Names the replaced systems read that no service here honours, and what to use instead.
NOT_HONOURED = {
    "DEBUG": "the Flask debug switch has no counterpart; for verbose logs set LOG_LEVEL=DEBUG",
    "ENABLE_CALLBACKS": "the REST MQTT proxy (POST /mqtt/subscribe, with or without "
                        "callback_url) has no switch of its own: the edge agent serves it "
                        "when PROXY_TOKEN is set and answers 404 on /mqtt/* otherwise; the "
                        "callback server always serves it, to operator and admin keys "
                        "(API_KEYS_FILE, or PROXY_TOKEN as an admin key)",
}


def not_honoured(env: Mapping[str, str], extra: Mapping[str, str]) -> list[str]:
    """A warning for each seed name set here that this service does not honour."""
    found = []
    for var, instead in {**NOT_HONOURED, **extra}.items():
        if env.get(var):
            found.append(f"{var} is set but not honoured by this service: {instead}")
    return found


def dotenv_warning(cwd: Path | None = None) -> list[str]:
    """A ``.env`` in the working directory is never read (docs/settings.md says why): say so
    when there is one, so nobody believes its values are in effect."""
    path = (cwd or Path.cwd()) / ".env"
    if path.is_file():
        return [f"{path} is not read (the services take their environment from the process "
                "only): load it with systemd's EnvironmentFile=, docker's --env-file, or "
                "`set -a; . ./.env; set +a`"]
    return []
