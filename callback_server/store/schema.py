"""The tables the store owns, declared once; the dialect turns them into DDL.

Two families: the product's own tables (``robot_state``, ``robot_events``, history, tasks,
the log, commands, alerts ...), every robot fact keyed by ``(org_id, robot_sn)``, created
and upgraded by ``migrate`` and recorded in ``store_tables``; and the targets of
``database_config.yaml`` (``mnt_robots_management`` / ``mnt_robot_events`` by default),
written as a projection of the own tables. A target the product did not create is never
altered (docs/storage.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bridge.topic import MAX_SN_BYTES

#: How many characters every own table's robot_sn (and an alert subject holding an sn)
#: takes: the longest sn the product accepts. On MySQL the widest own key, the events'
#: (org_id, robot_sn, event_id), is (128 + SN_CHARS + 128) * 4 bytes of utf8mb4, well
#: within InnoDB's 3072-byte index limit.
SN_CHARS = MAX_SN_BYTES

Kind = Literal["key", "str", "text", "int", "bool", "float", "time", "serial"]


@dataclass(frozen=True, slots=True)
class Column:
    """One column: a portable kind and, for strings, the most characters it takes."""

    name: str
    kind: Kind
    size: int = 0


@dataclass(frozen=True, slots=True)
class TableSpec:
    """Columns and primary key of one kind of table (it may exist under many names)."""

    columns: tuple[Column, ...]
    key: tuple[str, ...]
    #: The time column retention deletes by (indexed); None: kept forever.
    aged_by: str | None = None
    #: A column with a unique index besides the key (NULLs, as on legacy rows, may repeat).
    unique: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


# Latest-state groups, each with its own robot-time watermark column ``{group}_ts``.
# A group is the set of columns that always arrive together: battery comes alone from
# robotErrorNotice.extend_info, charge_state alone from some notifyRobotPower bodies,
# is_charging only from notifyRobotStatus. Were two of them one group, a newer message
# carrying only one would block an older message carrying the other, and the result
# would depend on delivery order. With these groups, applying each group whenever its
# ts is >= the stored watermark gives the same table for any order of delivery.
STATE_GROUPS: dict[str, tuple[str, ...]] = {
    "status": ("status",),              # robotStatus, notifyRobotStatus
    "battery": ("battery_level",),      # notifyRobotPower, notifyRobotStatus, robotErrorNotice
    "charge": ("charge_state",),        # notifyRobotPower, notifyRobotStatus
    "charging": ("is_charging",),       # notifyRobotStatus
    "move": ("move_state",),            # notifyRobotMoveState, notifyRobotStatus
    "pose": ("x", "y", "z", "yaw"),     # notifyRobotPose, robotErrorNotice (position)
    "map": ("map_name",),               # poll.pose (v1 status), robotErrorNotice.extend_info
}
WATERMARKS = tuple(f"{group}_ts" for group in STATE_GROUPS)
STATE_COLUMNS = tuple(c for cols in STATE_GROUPS.values() for c in cols)
#: Column order of one robot state row, as rows.py builds it and the upsert takes it.
ROBOT_ROW = ("robot_sn", "org_id", "gateway_id", *STATE_COLUMNS, *WATERMARKS, "last_ts",
             "last_updated")

#: The shape of a status target the product creates itself (today's richer shape, keyed
#: by robot_sn like the seed table it stands in for); seed targets keep their own shape.
ROBOTS = TableSpec(
    columns=(
        # the legacy shape
        Column("robot_sn", "key", SN_CHARS),
        Column("status", "str", 32),
        Column("battery_level", "int"),
        Column("water_level", "int"),      # kept for existing deployments; not written
        Column("sewage_level", "int"),     # kept for existing deployments; not written
        Column("x", "float"),
        Column("y", "float"),
        Column("z", "float"),
        Column("yaw", "float"),
        Column("charge_state", "str", 64),
        Column("last_updated", "time"),
        # added by this product
        Column("move_state", "str", 32),
        Column("is_charging", "bool"),
        Column("org_id", "str", 128),
        Column("gateway_id", "str", 128),
        *(Column(w, "float") for w in WATERMARKS),
        Column("last_ts", "float"),        # robot time of last_updated, as epoch seconds
        Column("map_name", "str", 128),
    ),
    key=("robot_sn",),
)
#: The shape of an events target the product creates itself.
EVENTS = TableSpec(
    columns=(
        Column("robot_sn", "key", SN_CHARS),
        Column("event_id", "key", 128),
        Column("event_level", "str", 16),
        Column("event_type", "str", 128),
        Column("event_detail", "text", 16000),  # fits a legacy TEXT (64 KiB) in utf8mb4
        Column("task_time", "time"),            # robot time of the event
        Column("upload_time", "time"),          # gateway time it was received
        Column("org_id", "str", 128),
        Column("gateway_id", "str", 128),
        Column("callback_type", "str", 64),
        Column("ts", "float"),
        Column("message_id", "str", 64),
    ),
    key=("robot_sn", "event_id"),
)


def _own(spec: TableSpec, key: tuple[str, ...]) -> TableSpec:
    """``spec`` keyed by ``key`` (org_id first, of kind key: binary collation on MySQL)."""
    cols = tuple(Column(c.name, "key", c.size) if c.name in key else c for c in spec.columns)
    return TableSpec(columns=cols, key=key)


#: The product's latest robot state: every fact of ROBOTS, one row per (org, robot).
STATE = _own(ROBOTS, ("org_id", "robot_sn"))
#: The product's robot events, one row per (org, robot, event id).
OWN_EVENTS = _own(EVENTS, ("org_id", "robot_sn", "event_id"))
STATE_TABLE = "robot_state"
OWN_EVENTS_TABLE = "robot_events"

#: The columns of the seed tables (docs/storage.md); anything else on a target table was
#: added (or created) by the product, and reads never use it.
SEED_ROBOT_COLUMNS = ("robot_sn", "status", "battery_level", "water_level", "sewage_level",
                      "x", "y", "z", "yaw", "charge_state", "last_updated")
SEED_EVENT_COLUMNS = ("robot_sn", "event_id", "event_level", "event_type", "event_detail",
                      "task_time", "upload_time")
#: Columns whose presence on a target means an earlier version wrote its bookkeeping there.
BOOKKEEPING = frozenset(c for c in (*ROBOTS.names, *EVENTS.names)
                        if c not in (*SEED_ROBOT_COLUMNS, *SEED_EVENT_COLUMNS))

#: The tables the product created or took over (``migrate``): only these it alters.
OWNERSHIP = TableSpec(
    columns=(
        Column("table_name", "key", 200),    # db.table as database_config.yaml names it
        Column("how", "str", 16),            # created | adopted (an earlier version's)
        Column("recorded_at", "time"),
    ),
    key=("table_name",),
)
OWNERSHIP_TABLE = "store_tables"

#: Which org a single-tenant target's robot belongs to: the first org to report the sn
#: there; a robot of another org with that sn is not written to that target.
CLAIMS = TableSpec(
    columns=(
        Column("target", "key", 200),
        Column("robot_key", "key", SN_CHARS),  # the sn as the target compares it (case-folded
        Column("org_id", "key", 128),        # where its collation ignores case)
        Column("claimed_at", "time"),
    ),
    key=("target", "robot_key"),
)
CLAIMS_TABLE = "target_robots"

LOG = TableSpec(
    columns=(
        Column("id", "key", 64),
        Column("topic", "str", 512),
        Column("type", "str", 64),
        Column("org_id", "key", 128),
        Column("device_id", "str", 128),
        Column("channel", "str", 128),
        Column("ts", "float"),
        Column("received_at", "float"),
        Column("stored_at", "time"),
        Column("payload", "text", 4_000_000),  # MEDIUMTEXT: 16 MiB of utf8mb4
    ),
    key=("org_id", "id"),  # envelope ids are unique per org, not across orgs
    aged_by="stored_at",
)
DEAD_LETTERS = TableSpec(
    columns=(
        Column("id", "serial"),
        Column("topic", "str", 512),
        Column("payload", "text", 4_000_000),  # undecodable bytes kept as \x.. escapes
        Column("reason", "text", 2000),
        Column("created_at", "time"),
        # SHA-256 of topic and payload: a message redelivered after a crash between the
        # dead letter's commit and its ack is not kept twice.
        Column("digest", "str", 64),
    ),
    key=("id",),
    aged_by="created_at",
    unique="digest",
)
COMMANDS = TableSpec(
    columns=(
        Column("message_id", "key", 64),
        Column("org_id", "key", 128),
        Column("device_id", "str", 128),
        Column("command", "str", 64),
        Column("args", "text", 60000),
        Column("outcome", "str", 16),
        Column("result", "text", 60000),
        Column("sent_at", "time"),
        Column("rtt_ms", "float"),
        Column("key_name", "str", 128),  # the API key that sent it (by name, never the key)
    ),
    key=("org_id", "message_id"),
    aged_by="sent_at",
)

#: One row per Pudu cloud poll run a gateway reported on its ``poll`` channel.
RUNS = TableSpec(
    columns=(
        Column("run_key", "key", 255),       # org/gateway/run_id, fitted (rows.key)
        Column("org_id", "str", 128),
        Column("gateway_id", "str", 128),
        Column("run_id", "str", 64),
        Column("status", "str", 16),
        Column("started_at", "time"),
        Column("ended_at", "time"),
        Column("started_ts", "float"),       # for ordering and the cursor
        Column("shops", "text", 4000),       # JSON lists
        Column("shops_failed", "text", 4000),
        Column("robots_seen", "int"),
        Column("envelopes_published", "int"),
        Column("events_backfilled", "int"),
        Column("api_calls", "int"),
        Column("api_retries", "int"),
        Column("errors", "int"),
        Column("error", "text", 2000),
        Column("window_start", "float"),
        Column("window_end", "float"),
        Column("stored_at", "time"),
    ),
    key=("run_key",),
)

#: Robot state over time, downsampled (``SqlStore.write_batch``): a snapshot of the state
#: row whenever a batch leaves a robot's status or charge state different from its last
#: point, and otherwise at most one a minute of robot time. Long enough for the console's
#: 24 h chart and its floor tracks; pruned by ``recorded_at`` (HISTORY_RETENTION_DAYS).
HISTORY = TableSpec(
    columns=(
        Column("robot_sn", "key", SN_CHARS),
        Column("ts", "float"),               # robot time of the state (its last_ts)
        Column("recorded_at", "time"),       # server time, what retention goes by
        Column("org_id", "key", 128),
        Column("gateway_id", "str", 128),
        Column("status", "str", 32),
        Column("battery_level", "int"),
        Column("charge_state", "str", 64),
        Column("x", "float"),
        Column("y", "float"),
        Column("yaw", "float"),
        Column("map_name", "str", 128),
    ),
    key=("org_id", "robot_sn", "ts"),
    aged_by="recorded_at",
)
#: Keys of a history point as ``GET /robots/{sn}/history`` returns it.
HISTORY_FIELDS = tuple(c.name for c in HISTORY.columns if c.name != "recorded_at")
#: A periodic point (battery, position) at most this often per robot, in robot seconds.
HISTORY_EVERY_SECONDS = 60

#: Each robot task's latest state (channel ``task``: notifyCleanStatus, TASK_STATUS), for
#: the console's robot page; pruned with the history (HISTORY_RETENTION_DAYS).
TASKS = TableSpec(
    columns=(
        Column("robot_sn", "key", SN_CHARS),
        Column("task_key", "key", 128),      # task_id, else task_name@task_time
        Column("org_id", "key", 128),
        Column("task_id", "str", 128),
        Column("task_name", "str", 255),
        Column("task_status", "str", 32),
        Column("task_time", "float"),        # robot time the task started, epoch seconds
        Column("remark", "text", 2000),
        Column("ts", "float"),               # robot time of this state
        Column("updated_at", "time"),        # server time, what retention goes by
    ),
    key=("org_id", "robot_sn", "task_key"),
    aged_by="updated_at",
)
#: Keys of a task as ``GET /robots/{sn}/tasks`` returns it.
TASK_FIELDS = ("robot_sn", "task_id", "task_name", "task_status", "task_time", "remark",
               "ts", "org_id")

LOG_TABLE = "mqtt_message_log"
RUNS_TABLE = "ingestion_runs"
DEAD_TABLE = "mqtt_dead_letters"
COMMAND_TABLE = "device_commands"
HISTORY_TABLE = "robot_history"
TASKS_TABLE = "robot_tasks"
#: The tables retention may prune (by their ``aged_by`` column); robots and events never.
PRUNABLE = {LOG_TABLE: LOG, DEAD_TABLE: DEAD_LETTERS, COMMAND_TABLE: COMMANDS,
            HISTORY_TABLE: HISTORY, TASKS_TABLE: TASKS}

# -- alerts (callback_server/alerts) ------------------------------------------------------
#: One row per alert. ``open_key`` (SHA-256 of rule, org, subject) is set while the alert
#: is open or acknowledged and NULL once resolved; its unique index is what lets at most
#: one alert per (rule, subject) be open whichever replica tries to open it.
ALERTS = TableSpec(
    columns=(
        Column("id", "key", 32),
        Column("rule", "str", 32),
        Column("org_id", "str", 128),
        Column("subject_type", "str", 16),
        Column("subject_id", "str", max(SN_CHARS, 128)),  # an sn or a gateway id
        Column("severity", "str", 16),
        Column("state", "str", 16),
        Column("opened_at", "float"),        # epoch seconds, server clock
        Column("updated_at", "float"),
        Column("acknowledged_by", "str", 128),  # the key's name, never the key
        Column("acknowledged_at", "float"),
        Column("comment", "text", 2000),
        Column("resolved_at", "float"),
        Column("condition_at", "float"),     # when the condition was last seen true
        Column("detail", "text", 8000),      # JSON
        Column("open_key", "str", 64),
    ),
    key=("id",),
    unique="open_key",
)
ALERT_SUBSCRIPTIONS = TableSpec(
    columns=(
        Column("id", "key", 32),
        Column("url", "str", 2048),
        Column("secret", "str", 256),        # needed to sign; never shown after creation
        Column("rules", "text", 2000),       # JSON list, or NULL: every rule
        Column("orgs", "text", 4000),        # JSON list; ["*"]: every org
        Column("created_by", "str", 128),
        Column("created_at", "float"),
    ),
    key=("id",),
)
ALERT_DELIVERIES = TableSpec(
    columns=(
        Column("id", "serial"),
        Column("subscription_id", "str", 32),
        Column("alert_id", "str", 32),
        Column("transition", "str", 32),
        Column("transition_id", "str", 32),
        Column("attempt", "int"),
        Column("outcome", "str", 16),        # delivered | failed | gave_up | refused
        Column("at", "float"),
    ),
    key=("id",),
)
#: A rule silenced for one subject until ``until`` (epoch seconds).
ALERT_SILENCES = TableSpec(
    columns=(
        Column("silence_key", "key", 64),    # the alert's open_key digest
        Column("rule", "str", 32),
        Column("org_id", "str", 128),
        Column("subject_type", "str", 16),
        Column("subject_id", "str", max(SN_CHARS, 128)),  # an sn or a gateway id
        Column("until", "float"),
        Column("created_by", "str", 128),
    ),
    key=("silence_key",),
)
#: What the time-based rules need per robot: when this server side last heard of it,
#: and since when its move state is ``stuck`` (server clock, not the robot's).
ALERT_WATCH = TableSpec(
    columns=(
        Column("robot_sn", "key", SN_CHARS),
        Column("org_id", "key", 128),
        Column("seen_at", "float"),
        Column("stuck_since", "float"),
        Column("first_seen", "float"),  # the alert rules' window for facts never sent
    ),
    key=("org_id", "robot_sn"),
)
#: Short leases: one replica at a time runs the time-based sweep.
ALERT_LEASES = TableSpec(
    columns=(
        Column("name", "key", 64),
        Column("holder", "str", 128),
        Column("expires", "float"),
    ),
    key=("name",),
)
ALERTS_TABLE = "alerts"
ALERT_SUBSCRIPTIONS_TABLE = "alert_subscriptions"
ALERT_DELIVERIES_TABLE = "alert_deliveries"
ALERT_SILENCES_TABLE = "alert_silences"
ALERT_WATCH_TABLE = "alert_watch"
ALERT_LEASES_TABLE = "alert_leases"
#: Every alert table, created on start like the others.
ALERT_TABLES: dict[str, TableSpec] = {
    ALERTS_TABLE: ALERTS, ALERT_SUBSCRIPTIONS_TABLE: ALERT_SUBSCRIPTIONS,
    ALERT_DELIVERIES_TABLE: ALERT_DELIVERIES, ALERT_SILENCES_TABLE: ALERT_SILENCES,
    ALERT_WATCH_TABLE: ALERT_WATCH, ALERT_LEASES_TABLE: ALERT_LEASES,
}

#: The event webhooks, their delivery log and the gateways' presence as last told
#: (callback_server/webhooks): the product
#: makes them, so ``migrate`` creates them and records them in ``store_tables`` like the
#: rest. The webhook store reads and writes them (and makes their indexes).
WEBHOOKS_TABLE = "webhooks"
WEBHOOK_DELIVERIES_TABLE = "webhook_deliveries"
WEBHOOKS = TableSpec(
    columns=(
        Column("id", "key", 32),
        Column("url", "str", 2048),
        Column("secret", "str", 256),        # needed to sign; never shown after creation
        Column("events", "text", 2000),      # JSON list of event names
        Column("orgs", "text", 4000),        # JSON list; ["*"]: every org
        Column("created_by", "str", 128),
        Column("created_at", "float"),
        Column("rules", "text", 2000),       # JSON list of alert rules; NULL: every rule
        Column("style", "str", 16),          # event | alert (an alert subscription); NULL: event
    ),
    key=("id",),
)
WEBHOOK_DELIVERIES = TableSpec(
    columns=(
        Column("id", "serial"),
        Column("webhook_id", "str", 32),
        Column("event_id", "str", 32),
        Column("event", "str", 32),
        Column("attempt", "int"),
        Column("status", "int"),             # HTTP status; NULL: no answer
        Column("latency_ms", "float"),
        Column("outcome", "str", 16),        # delivered | failed | gave_up | refused
        Column("at", "float"),
        Column("ref", "str", 64),            # what the event is about: an alert's id
    ),
    key=("id",),
)
WEBHOOK_PRESENCE_TABLE = "webhook_presence"
#: One row per gateway ever heard of (never pruned: a gateway's last word is what a
#: restarted server compares the next one with).
WEBHOOK_PRESENCE = TableSpec(
    columns=(
        Column("org_id", "key", 128),       # fitted (rows.key): a topic level has no bound
        Column("gateway_id", "key", 128),
        Column("state", "str", 32),          # online | offline
        Column("since", "float"),            # when it was told
    ),
    key=("org_id", "gateway_id"),
)
WEBHOOK_TABLES: dict[str, TableSpec] = {
    WEBHOOKS_TABLE: WEBHOOKS, WEBHOOK_DELIVERIES_TABLE: WEBHOOK_DELIVERIES,
    WEBHOOK_PRESENCE_TABLE: WEBHOOK_PRESENCE,
}
