"""Scheduled reconciliation with the Pudu cloud: fleet state and fault backfill.

Webhooks alone miss state (Pudu gives up after 3 tries, a gateway that was down misses
that window, cleaning robots send no pose or power callbacks), so every run lists the
configured shops' robots, reads each robot's v2 and v1 status, and publishes what
changed as ordinary envelopes (``source: "poll"``); then it reads each shop's fault log
for [that shop's previous complete window's end - overlap, now] and publishes its events
with the id a webhook for the same ``error_id`` carries, so the cloud stores them once.
A shop's window advances only when every row of it is in the outbox (a full outbox
fails the shop, to be read again); a row that is bad input is skipped.

"What changed" is measured against what the cloud was last told about a robot: a
webhook that changes a field forgets the poller's copy of it (``forget``), so the next
run republishes the API's state even when it equals what the poller sent before.

Runs hold a lock (they never overlap), go through the outbox like webhooks (so nothing
published is lost), and only await network I/O: the webhook path never waits for them.
One failing shop or robot is recorded and the others go on. Every run leaves a record
in the journal, on health and /metrics, and as an envelope on the gateway's ``poll``
channel.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from bridge.envelope import Envelope
from bridge.errors import (
    ConfigError,
    FleetError,
    InputError,
    PayloadError,
    PuduApiError,
    TopicError,
)
from bridge.outbox import PutResult
from bridge.pudu.normalize import COMPACTABLE, Normalized, normalize, to_seconds
from edge_agent.pudu.api_client import PuduClient, pick
from edge_agent.pudu.schedule import Clock, SystemClock

if TYPE_CHECKING:
    from edge_agent.ports import PollHost

log = logging.getLogger(__name__)

#: A fault-log row failing with these is bad input: skipped (counted), the rest goes on.
BAD_ROW = (InputError, PayloadError, TopicError)
#: ``edge-agent poll`` and POST /pudu/poll with nothing to poll.
NO_SHOPS = ("no shops to poll: set PUDU_SHOP_IDS (gateways sharing one key each poll only "
            "their own shops)")
#: Fault-log windows are read in chunks of at most a day (Pudu's maximum is undocumented).
CHUNK_SECONDS = 86400
_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S.%f",
                 "%Y-%m-%dT%H:%M:%SZ")


def log_time(value: Any) -> float | None:
    """A fault-log time (``Y-m-d H:i:s`` in UTC, as asked with timezone_offset=0, or epoch
    s/ms) as epoch seconds; None if it is neither."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return to_seconds(float(value)) if value > 0 else None
    text = str(value).strip()
    try:
        return to_seconds(float(text))
    except ValueError:
        pass
    for fmt in _TIME_FORMATS:
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    return None


def _digest(parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _put(data: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        data[key] = value


def state_bodies(sn: str, v2: dict[str, Any], v1: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API's robot state as webhook-shaped callbacks per channel (spec camelCase or
    the third-party snake_case), so one normaliser names and checks every field."""
    stamp = pick(v2, "timestamp") or pick(v1, "timestamp")
    status: dict[str, Any] = {"sn": sn, "notify_timestamp": stamp}
    for key, names in (("run_state", ("runState", "run_state")),
                       ("is_charging", ("isCharging", "is_charging")),
                       ("move_state", ("moveState", "move_state")),
                       ("charge_type", ("chargeType", "charge_type")),
                       ("remain_time", ("remainTime", "remain_time"))):
        _put(status, key, pick(v2, *names))
    power: dict[str, Any] = {"sn": sn, "notify_timestamp": stamp}
    _put(power, "power", pick(v2, "battery") if v2 else pick(v1, "battery"))
    _put(power, "charge_stage", pick(v2, "chargeStage", "charge_stage") if v2 else
         pick(v1, "chargeStage", "charge_stage"))
    pose: dict[str, Any] = {"sn": sn, "notify_timestamp": pick(v1, "timestamp") or stamp}
    position = pick(v1, "position")
    if isinstance(position, dict):
        for axis in ("x", "y", "z", "yaw"):
            _put(pose, axis, position.get(axis))
    return {"status": {"callback_type": "notifyRobotStatus", "data": status},
            "power": {"callback_type": "notifyRobotPower", "data": power},
            "pose": {"callback_type": "notifyRobotPose", "data": pose}}


class Run:
    """One run's counters, becoming its record."""

    def __init__(self, agent: PollHost, shops: tuple[str, ...], start: float) -> None:
        self.record: dict[str, Any] = {
            "run_id": f"{int(start)}-{uuid.uuid4().hex[:8]}",
            "org_id": agent.settings.org_id, "gateway_id": agent.settings.gateway_id,
            "started_at": round(start, 3), "ended_at": None, "status": "running",
            "shops": list(shops), "shops_failed": [], "robots_seen": 0,
            "envelopes_published": 0, "events_backfilled": 0, "api_calls": 0,
            "api_retries": 0, "errors": 0, "error": None, "window_start": None,
            "window_end": None, "events_through": None,
        }

    def fail(self, where: str, exc: BaseException) -> None:
        self.record["errors"] += 1
        message = f"{where}: {exc}"[:500]
        if self.record["error"] is None:
            self.record["error"] = message
        log.warning("poll run %s: %s", self.record["run_id"], message)


class Poller:
    """Runs reconciliation on a schedule (``run``) or on demand (``run_once``)."""

    def __init__(self, agent: PollHost,
                 client_factory: Callable[[], PuduClient] | None = None) -> None:
        self.agent = agent
        self.settings = agent.settings.pudu
        self.client_factory = client_factory or (
            lambda: PuduClient(self.settings, agent.outbound))
        self.running = False
        self.clock: Clock = SystemClock()  # tests drive the schedule with a fake one
        self.last: dict[str, Any] | None = None
        self.runs = 0
        #: When the schedule's next run is due (epoch s); None while not scheduling.
        self.next_run: float | None = None
        #: Why scheduled polling stopped (a cron() year field that ran out); None while on.
        self.ended: str | None = None
        self._lock = asyncio.Lock()
        # (sn, channel) -> (data last published, its field names): only what changed is
        # published again; a webhook touching one of the fields forgets the entry.
        self._published: dict[tuple[str, str], tuple[str, frozenset[str]]] = {}
        self.shop_of: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        """Polling is configured and the schedule has run times left (health's ``enabled``
        turns false when a year-bounded cron() runs out)."""
        return self.settings.polling and self.ended is None

    async def run(self) -> None:
        """The schedule (``settings.schedule``): each run at its run time on ``clock``.

        After a restart the first due time is the one following the journal's last run: if
        that passed while the gateway was down, one catch-up run happens now (not one per
        missed time). With no run ever recorded, a rate() schedule runs at once (a new
        gateway reconciles straight away) and a cron() one waits for its time.

        A cron() whose year field runs out ends the schedule: said once in the log and in
        ``ended``, and this returns; the agent goes on (webhooks, commands, polls asked
        for)."""
        schedule = self.settings.schedule
        last = await self.last_started()
        now = self.clock.now()
        due: float | None
        if last is not None:
            due = schedule.next_after(last)
        else:
            due = now if schedule.period is not None else schedule.next_after(now)
        while due is not None:
            self.next_run = due
            wait = due - self.clock.now()
            if wait > 0:
                await self.clock.sleep(wait)
                continue  # a sleep may end early: look at the clock again
            try:
                await self.run_once()
            except Exception:  # a bug must not end the schedule
                log.exception("poll run failed unexpectedly")
            # A run that outlasted run times skips them: the next is after now.
            due = schedule.next_after(max(due, self.clock.now()))
        self.next_run = None
        self.ended = (f"poll schedule {schedule.expression} has no run time left: scheduled "
                      "polling stopped")
        log.warning("%s (the agent goes on; POST /pudu/poll still runs one)", self.ended)

    async def last_started(self) -> float | None:
        """When the last recorded run started (the journal survives restarts)."""
        records, _ = await self.agent.journal.runs(limit=1)
        started = records[0].get("started_at") if records else None
        return float(started) if isinstance(started, int | float) else None

    def forget_robot(self, sn: str) -> None:
        """A robot not polled nor heard of for long (edge_agent.robot_memory): gone from
        the inventory; drop what is kept for it."""
        self.shop_of.pop(sn, None)
        for channel in ("status", "power", "pose"):
            self._published.pop((sn, channel), None)

    def __len__(self) -> int:
        """Entries kept per robot (shop and last published state per channel)."""
        return len(self.shop_of) + len(self._published)

    def forget(self, sn: str, fields: Iterable[str]) -> None:
        """A webhook set these fields of robot ``sn``: the cloud's copy is no longer what
        the poller published, so the next run compares against nothing and republishes."""
        if not self._published:  # nothing polled (no shops): the common case, at once
            return
        touched = set(fields)
        for channel in ("status", "power", "pose"):
            entry = self._published.get((sn, channel))
            if entry is not None and entry[1] & touched:
                del self._published[(sn, channel)]

    async def run_once(self) -> dict[str, Any]:
        """One reconciliation; waits for a run in progress first (never overlapping).

        Raises ConfigError when no shops are configured: a run of nothing would succeed
        and say nothing was wrong."""
        if not self.settings.shop_ids:
            raise ConfigError(NO_SHOPS)
        async with self._lock:
            self.running = True
            try:
                return await self._run()
            finally:
                self.running = False

    async def _run(self) -> dict[str, Any]:
        agent = self.agent
        shops = self.settings.shop_ids
        now = self.clock.now()
        run = Run(agent, shops, now)
        rec = run.record
        lookback = now - self.settings.lookback_hours * 3600
        starts: dict[str, float] = {}
        for shop in shops:
            through = await agent.journal.events_through(shop)
            starts[shop] = lookback if through is None else max(
                lookback, through - self.settings.overlap_seconds)
        rec["window_start"], rec["window_end"] = int(min(starts.values())), int(now)
        failed: list[str] = []
        client = self.client_factory()
        try:
            async with client:
                for shop in shops:
                    try:
                        await self._shop(client, run, shop, int(starts[shop]), int(now))
                        await agent.journal.advance_events(shop, int(now))
                    except (PuduApiError, FleetError) as exc:
                        failed.append(shop)
                        run.fail(f"shop {shop}", exc)
        finally:
            rec["api_calls"], rec["api_retries"] = client.calls, client.retries
        rec["shops_failed"] = failed
        rec["ended_at"] = round(self.clock.now(), 3)
        if not failed:
            rec["events_through"] = int(now)
        rec["status"] = ("ok" if not rec["errors"] else
                         "failed" if len(failed) == len(shops) else "partial")
        await self._finish(rec)
        return rec

    async def _shop(self, client: PuduClient, run: Run, shop: str, start: int,
                    end: int) -> None:
        robots = await client.robots(shop)
        for robot in robots:
            sn = str(pick(robot, "sn")).strip()
            self.shop_of[sn] = shop
            self.agent.robot_memory.heard(sn)  # listed: never forgotten while it is
            run.record["robots_seen"] += 1
            try:
                v2 = await client.status(sn)
                v1 = await client.status_v1(sn)
                await self._publish_state(run, sn, v2, v1, pick(v1, "mapName", "map_name"))
            except (PuduApiError, FleetError) as exc:
                run.fail(f"robot {sn}", exc)
        # The fault log after the state: a shop whose log fails (the API, or the outbox
        # refusing a row) is marked failed, so the next run reads its window again. Only
        # a row that can never be published is skipped.
        chunk = start
        while chunk < end:
            upto = min(end, chunk + CHUNK_SECONDS)
            for row in await client.error_log(shop, chunk, upto):
                try:
                    await self._publish_event(run, row)
                except BAD_ROW as exc:
                    run.fail(f"log row {pick(row, 'id')} skipped", exc)
            chunk = upto

    def _normalize(self, body: dict[str, Any], received: float) -> Normalized:
        """As the webhook normalises: a robot time too far ahead is replaced, counted in
        ``edge_clock_skew_total`` and logged, whichever path brought it."""
        norm = normalize(body, received_at=received,
                         max_skew=self.agent.settings.max_clock_skew_seconds)
        if norm.skewed:
            self.agent.metrics.clock_skew.inc()
            log.warning("robot %s (poll): %s", norm.device_id, norm.skew_note)
        return norm

    async def _publish_state(self, run: Run, sn: str, v2: dict[str, Any],
                             v1: dict[str, Any], map_name: Any) -> None:
        bodies = state_bodies(sn, v2, v1)
        raws = {"status": v2, "power": v2 or v1, "pose": v1}
        for channel, body in bodies.items():
            received = time.time()
            norm = self._normalize(body, received)
            data = dict(norm.data)
            if channel == "status":
                data.pop("battery_level", None)  # poll.power carries it
                data.pop("charge_state", None)
            if channel == "pose" and isinstance(map_name, str) and map_name.strip():
                data["map_name"] = map_name.strip()
            if not data:
                continue
            key = (sn, channel)
            shape = json.dumps(data, sort_keys=True, default=str)
            last = self._published.get(key)
            if last is not None and last[0] == shape:
                continue
            kind = f"poll.{channel}"
            env = Envelope(
                id="poll-" + _digest([kind, sn, data, norm.ts]), type=kind,
                org=self.agent.settings.org_id, device=sn,
                gateway=self.agent.settings.gateway_id, ts=norm.ts, received_at=received,
                data=data, raw=raws[channel], channel=channel, source="poll",
                notes=norm.notes)
            result = await self._put(env, compact=f"{channel}:{sn}" if channel in COMPACTABLE
                                     else None)
            self._published[key] = (shape, frozenset(data))
            if result is not PutResult.DUPLICATE:  # the same state already went out
                run.record["envelopes_published"] += 1

    async def _publish_event(self, run: Run, row: dict[str, Any]) -> None:
        sn = pick(row, "sn")
        if sn in (None, ""):
            raise InputError("fault log row without sn", field="sn")
        data: dict[str, Any] = {"sn": sn}
        for key in ("error_level", "error_type", "error_detail", "error_id", "mac"):
            _put(data, key, pick(row, key))
        _put(data, "timestamp", log_time(pick(row, "task_time", "upload_time")))
        received = time.time()
        norm = self._normalize({"callback_type": "robotErrorWarning", "data": data}, received)
        env = Envelope(
            id=norm.message_id, type="poll.event", org=self.agent.settings.org_id,
            device=str(norm.device_id), gateway=self.agent.settings.gateway_id, ts=norm.ts,
            received_at=received, data=norm.data, raw=row, channel="event", source="poll",
            notes=norm.notes)
        if await self._put(env, compact=None) is PutResult.ACCEPTED:
            run.record["events_backfilled"] += 1
            run.record["envelopes_published"] += 1

    async def _put(self, env: Envelope, *, compact: str | None) -> PutResult:
        topic = str(self.agent.scheme.device(env.device, env.channel))
        payload = env.to_json()
        # What the broker would refuse (AWS IoT: a topic over 256 bytes) fails this robot
        # or row in the run record now, instead of being set aside after the outbox.
        self.agent.transport.check_publish(topic, payload, 1)
        result = await self.agent.outbox.put(topic, payload, qos=1, compact_key=compact,
                                             dedup_keys=[f"poll:{env.id}"], order=env.ts)
        self.agent.note_robot(env)
        return result

    async def _finish(self, rec: dict[str, Any]) -> None:
        """Journal, metrics, and the record on the gateway's own ``poll`` channel."""
        self.last = rec
        self.runs += 1
        agent = self.agent
        m = agent.metrics
        m.poll_runs.labels(status=rec["status"]).inc()
        m.poll_api_calls.inc(rec["api_calls"])
        m.poll_api_retries.inc(rec["api_retries"])
        m.poll_published.inc(rec["envelopes_published"])
        m.poll_last_run.set(rec["ended_at"])
        log.info("poll run %s %s: %d robots, %d published, %d events, %d API calls (%d "
                 "retries)", rec["run_id"], rec["status"], rec["robots_seen"],
                 rec["envelopes_published"], rec["events_backfilled"], rec["api_calls"],
                 rec["api_retries"])
        try:
            await agent.journal.save_run(rec)
        except FleetError as exc:
            log.warning("poll run %s not journaled: %s", rec["run_id"], exc)
        gateway = agent.settings.gateway_id
        env = Envelope(id=f"run-{rec['run_id']}", type="poll.run", org=agent.settings.org_id,
                       device=gateway, gateway=gateway, ts=rec["ended_at"],
                       received_at=rec["ended_at"], data=rec, channel="poll", source="poll")
        try:
            await agent.outbox.put(str(agent.scheme.device(gateway, "poll")), env.to_json(),
                                   qos=1)
        except FleetError as exc:  # journaled above; the caller still gets the record
            log.warning("poll run %s not published: %s", rec["run_id"], exc)
