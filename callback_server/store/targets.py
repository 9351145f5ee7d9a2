"""Which tables to write: the existing ``database_config.yaml`` format.

```yaml
databases: [ops, analytics]
tables:
  robot_status:
    - {database: ops, table_name: mnt_robots_management, primary_keys: [robot_sn]}
  robot_events:
    - {database: ops, table_name: mnt_robot_events, primary_keys: [robot_sn, event_id]}
    - {database: analytics, table_name: mnt_robot_events, primary_keys: [robot_sn, event_id]}
```
Every listed target is written. Without a file, both tables live in the URL's database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bridge.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")


@dataclass(frozen=True, slots=True)
class Table:
    """One target table; ``database`` None means the connection's own database."""

    database: str | None
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.database}.{self.name}" if self.database else self.name


@dataclass(frozen=True, slots=True)
class Targets:
    robot_status: tuple[Table, ...] = (Table(None, "mnt_robots_management"),)
    robot_events: tuple[Table, ...] = (Table(None, "mnt_robot_events"),)

    @property
    def databases(self) -> set[str]:
        return {t.database for t in (*self.robot_status, *self.robot_events) if t.database}


def _tables(entries: Any, kind: str, path: str) -> tuple[Table, ...]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: tables.{kind} must be a non-empty list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "table_name" not in entry:
            raise ConfigError(f"{path}: tables.{kind}[{i}] needs table_name")
        name, database = str(entry["table_name"]), entry.get("database")
        for value in (name, database):
            if value is not None and not _NAME.match(str(value)):
                raise ConfigError(f"{path}: tables.{kind}[{i}]: bad identifier {value!r}")
        out.append(Table(str(database) if database else None, name))
    return tuple(out)


def load_targets(path: str | Path) -> Targets:
    """Parse ``database_config.yaml``; ConfigError names what is wrong."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read database config {path}: {exc}") from exc
    tables = doc.get("tables") if isinstance(doc, dict) else None
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: needs a 'tables' mapping")
    return Targets(
        robot_status=_tables(tables.get("robot_status"), "robot_status", str(path)),
        robot_events=_tables(tables.get("robot_events"), "robot_events", str(path)),
    )
