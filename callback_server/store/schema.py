"""Tables, and the one place where MySQL and SQLite SQL differ.

Table and column names are the ones existing deployments use (DESIGN.md, "Storage");
columns beyond them are added to an existing table if missing, never renamed.
"""

from __future__ import annotations

from dataclasses import dataclass

# Each latest-state group has its own robot-time watermark, so pose updates never wipe
# status (and vice versa) and an older ts never overwrites newer state of that group.
# A group is always written whole by every callback that carries it (battery comes
# alone from robotErrorNotice.extend_info, so it cannot share a watermark with
# charge_state): applying groups independently then equals in-order delivery.
STATE_GROUPS: dict[str, tuple[str, ...]] = {
    "status": ("status",),
    "battery": ("battery_level",),
    "charge": ("charge_state",),
    "charging": ("is_charging",),
    "pose": ("x", "y", "z", "yaw"),
    "move": ("move_state",),
}

# (column, mysql type, sqlite type) per table; the first block is the legacy shape.
ROBOT_COLUMNS = [
    ("robot_sn", "VARCHAR(64) NOT NULL", "TEXT NOT NULL"),
    ("status", "VARCHAR(32)", "TEXT"),
    ("battery_level", "INT", "INTEGER"),
    ("water_level", "INT", "INTEGER"),
    ("sewage_level", "INT", "INTEGER"),
    ("x", "DOUBLE", "REAL"),
    ("y", "DOUBLE", "REAL"),
    ("z", "DOUBLE", "REAL"),
    ("yaw", "DOUBLE", "REAL"),
    ("charge_state", "VARCHAR(64)", "TEXT"),
    ("last_updated", "DATETIME(3)", "TEXT"),
    ("move_state", "VARCHAR(32)", "TEXT"),
    ("is_charging", "TINYINT", "INTEGER"),
    ("org_id", "VARCHAR(128)", "TEXT"),
    ("gateway_id", "VARCHAR(128)", "TEXT"),
    *((f"{group}_ts", "DOUBLE", "REAL") for group in STATE_GROUPS),
    ("last_ts", "DOUBLE", "REAL"),
]
EVENT_COLUMNS = [
    ("robot_sn", "VARCHAR(64) NOT NULL", "TEXT NOT NULL"),
    ("event_id", "VARCHAR(128) NOT NULL", "TEXT NOT NULL"),
    ("event_level", "VARCHAR(16)", "TEXT"),
    ("event_type", "VARCHAR(128)", "TEXT"),
    ("event_detail", "TEXT", "TEXT"),
    ("task_time", "DATETIME(3)", "TEXT"),
    ("upload_time", "DATETIME(3)", "TEXT"),
    ("org_id", "VARCHAR(128)", "TEXT"),
    ("gateway_id", "VARCHAR(128)", "TEXT"),
    ("callback_type", "VARCHAR(64)", "TEXT"),
    ("ts", "DOUBLE", "REAL"),
    ("message_id", "VARCHAR(64)", "TEXT"),
]
LOG_COLUMNS = [
    ("id", "VARCHAR(64) NOT NULL", "TEXT NOT NULL"),
    ("topic", "VARCHAR(512) NOT NULL", "TEXT NOT NULL"),
    ("type", "VARCHAR(64)", "TEXT"),
    ("org_id", "VARCHAR(128)", "TEXT"),
    ("device_id", "VARCHAR(128)", "TEXT"),
    ("channel", "VARCHAR(128)", "TEXT"),
    ("ts", "DOUBLE", "REAL"),
    ("received_at", "DOUBLE", "REAL"),
    ("stored_at", "DATETIME(3)", "TEXT"),
    ("payload", "MEDIUMTEXT", "TEXT"),
]
DEAD_COLUMNS = [
    ("id", "BIGINT AUTO_INCREMENT", "INTEGER"),
    ("topic", "VARCHAR(512)", "TEXT"),
    ("payload", "MEDIUMTEXT", "TEXT"),  # undecodable bytes kept as \x.. escapes
    ("reason", "TEXT", "TEXT"),
    ("created_at", "DATETIME(3)", "TEXT"),
]
COMMAND_COLUMNS = [
    ("message_id", "VARCHAR(64) NOT NULL", "TEXT NOT NULL"),
    ("org_id", "VARCHAR(128)", "TEXT"),
    ("device_id", "VARCHAR(128)", "TEXT"),
    ("command", "VARCHAR(64)", "TEXT"),
    ("args", "TEXT", "TEXT"),
    ("outcome", "VARCHAR(16)", "TEXT"),
    ("result", "TEXT", "TEXT"),
    ("sent_at", "DATETIME(3)", "TEXT"),
    ("rtt_ms", "DOUBLE", "REAL"),
]

LOG_TABLE = "mqtt_message_log"
DEAD_TABLE = "mqtt_dead_letters"
COMMAND_TABLE = "device_commands"


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between MySQL and SQLite, and nothing else."""

    name: str

    @property
    def mysql(self) -> bool:
        return self.name == "mysql"

    @property
    def mark(self) -> str:
        return "%s" if self.mysql else "?"

    def quote(self, table: str) -> str:
        """``db.table`` -> `db`.`table` (MySQL) or "db"."table" (SQLite)."""
        q = "`" if self.mysql else '"'
        return ".".join(f"{q}{part}{q}" for part in table.split("."))

    def create_table(self, table: str, columns: list[tuple[str, str, str]],
                     primary_key: tuple[str, ...]) -> str:
        cols = [f"{name} {my if self.mysql else lite}" for name, my, lite in columns]
        if "AUTO_INCREMENT" in columns[0][1] and not self.mysql:
            cols[0] = f"{columns[0][0]} INTEGER PRIMARY KEY AUTOINCREMENT"
        else:
            cols.append(f"PRIMARY KEY ({', '.join(primary_key)})")
        tail = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4" if self.mysql else ""
        return f"CREATE TABLE IF NOT EXISTS {self.quote(table)} ({', '.join(cols)}){tail}"

    def add_column(self, table: str, column: tuple[str, str, str]) -> str:
        name, my, lite = column
        kind = (my if self.mysql else lite).replace(" NOT NULL", "")
        return f"ALTER TABLE {self.quote(table)} ADD COLUMN {name} {kind}"

    def insert_ignore(self, table: str, columns: list[str]) -> str:
        verb = "INSERT IGNORE" if self.mysql else "INSERT OR IGNORE"
        marks = ", ".join([self.mark] * len(columns))
        return f"{verb} INTO {self.quote(table)} ({', '.join(columns)}) VALUES ({marks})"

    def insert(self, table: str, columns: list[str]) -> str:
        marks = ", ".join([self.mark] * len(columns))
        return f"INSERT INTO {self.quote(table)} ({', '.join(columns)}) VALUES ({marks})"

    def state_upsert(self, table: str, group: str) -> str:
        """Upsert one state group; the row only moves forward in robot time."""
        cols = STATE_GROUPS[group]
        ts = f"{group}_ts"
        insert_cols = ["robot_sn", "org_id", "gateway_id", *cols, ts, "last_ts", "last_updated"]
        if self.mysql:
            def new(c: str) -> str:
                return f"VALUES({c})"

            def old(c: str) -> str:
                return c

            greatest = "GREATEST"
            head = "ON DUPLICATE KEY UPDATE"
        else:
            def new(c: str) -> str:
                return f"excluded.{c}"

            def old(c: str) -> str:
                return c  # SQLite: unqualified names in DO UPDATE are the existing row

            greatest = "MAX"
            head = "ON CONFLICT(robot_sn) DO UPDATE SET"
        newer = f"{new(ts)} >= COALESCE({old(ts)}, -1)"
        newest = f"{new('last_ts')} >= COALESCE({old('last_ts')}, -1)"

        def pick(c: str, cond: str) -> str:
            return f"{c} = CASE WHEN {cond} THEN {new(c)} ELSE {old(c)} END"

        # MySQL evaluates these left to right with already-updated values: the
        # watermarks must come last. SQLite reads the old row throughout.
        sets = [pick(c, newer) for c in cols]
        sets += [pick("org_id", newest), pick("gateway_id", newest), pick("last_updated", newest)]
        sets += [f"{ts} = {greatest}(COALESCE({old(ts)}, -1), {new(ts)})",
                 f"last_ts = {greatest}(COALESCE({old('last_ts')}, -1), {new('last_ts')})"]
        return f"{self.insert(table, insert_cols)} {head} {', '.join(sets)}"
