"""Which tables to write, from the existing ``database_config.yaml`` format.

```yaml
databases: [fleet, analytics]
tables:
  robot_status:
    - {database: fleet, table_name: mnt_robots_management, primary_keys: [robot_sn]}
  robot_events:
    - {database: fleet, table_name: mnt_robot_events, primary_keys: [robot_sn, event_id]}
    - {database: analytics, table_name: mnt_robot_events, primary_keys: [robot_sn, event_id],
       orgs: [acme]}
```

Every listed target is written in the same transaction, as a projection of the
product's own tables (projection.py); reads use only the own tables (docs/storage.md).
A target without ``database`` lives in the ``DATABASE_URL``'s database; a kind left out
of the file keeps its default table there. ``primary_keys``, when given,
must be the keys the store upserts by (anything else could not be idempotent).
``databases`` is informational (the tables say where they live). A target is keyed by
robot_sn alone, so it holds one org's robot per sn: ``orgs`` (optional) lists the orgs
written there (default: every org); the first org to report an sn keeps it, and a robot
of another org with that sn is not written to that target (logged), never merged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from bridge.errors import ConfigError

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
ROBOT_STATUS_KEY = ("robot_sn",)
ROBOT_EVENTS_KEY = ("robot_sn", "event_id")


def _identifier(value: str) -> str:
    # Names end up in SQL text (they cannot be bound parameters): letters, digits, _.
    if not _IDENTIFIER.match(value):
        raise ValueError(f"{value!r} is not a plain identifier (letters, digits, _; max 64)")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]


@dataclass(frozen=True, slots=True)
class Table:
    """One target table; ``database`` None means the connection's own database."""

    database: str | None
    name: str
    #: The orgs whose robots this target is written for; None: every org.
    orgs: frozenset[str] | None = None

    def takes(self, org: str) -> bool:
        return self.orgs is None or org in self.orgs

    @property
    def qualified(self) -> str:
        return f"{self.database}.{self.name}" if self.database else self.name


@dataclass(frozen=True, slots=True)
class Targets:
    """Where latest robot state and robot events go (each: one or more tables)."""

    robot_status: tuple[Table, ...] = (Table(None, "mnt_robots_management"),)
    robot_events: tuple[Table, ...] = (Table(None, "mnt_robot_events"),)
    listed_databases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.robot_status or not self.robot_events:
            raise ConfigError("database targets need at least one table of each kind")

    @property
    def databases(self) -> set[str]:
        """Databases the tables name (besides the URL's own)."""
        return {t.database for t in (*self.robot_status, *self.robot_events) if t.database}


class _Entry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    database: Identifier | None = None
    table_name: Identifier
    primary_keys: list[str] | None = None
    orgs: list[str] | None = None


class _Tables(BaseModel):
    model_config = ConfigDict(extra="ignore")

    robot_status: list[_Entry] | None = None
    robot_events: list[_Entry] | None = None


class _File(BaseModel):
    model_config = ConfigDict(extra="ignore")

    databases: list[Any] = []
    tables: _Tables


def _tables(entries: list[_Entry] | None, kind: str, key: tuple[str, ...],
            default: tuple[Table, ...], where: str) -> tuple[Table, ...]:
    if entries is None:
        return default
    if not entries:
        raise ConfigError(f"{where}: tables.{kind} is empty; list a table or leave it out")
    out: list[Table] = []
    for i, entry in enumerate(entries):
        if entry.primary_keys is not None and sorted(entry.primary_keys) != sorted(key):
            raise ConfigError(
                f"{where}: tables.{kind}[{i}].primary_keys must be {list(key)} "
                f"(the store writes by that key), got {entry.primary_keys}"
            )
        if entry.orgs is not None and not entry.orgs:
            raise ConfigError(f"{where}: tables.{kind}[{i}].orgs is empty; list an org or "
                              "leave it out (every org)")
        table = Table(entry.database, entry.table_name,
                      None if entry.orgs is None else frozenset(entry.orgs))
        if all(t.qualified != table.qualified for t in out):
            out.append(table)
    return tuple(out)


def _database_name(item: Any) -> str:
    if isinstance(item, dict):
        item = item.get("name") or item.get("database") or ""
    return str(item)


def load_targets(path: str | Path) -> Targets:
    """Parse ``database_config.yaml``; ConfigError names the file and the field."""
    where = str(path)
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read database config {where}: {exc}") from exc
    try:
        parsed = _File.model_validate(doc if doc is not None else {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{where}: {problems}") from None
    defaults = Targets()
    return Targets(
        robot_status=_tables(parsed.tables.robot_status, "robot_status", ROBOT_STATUS_KEY,
                             defaults.robot_status, where),
        robot_events=_tables(parsed.tables.robot_events, "robot_events", ROBOT_EVENTS_KEY,
                             defaults.robot_events, where),
        listed_databases=tuple(_database_name(d) for d in parsed.databases),
    )
