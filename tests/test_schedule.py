"""Poll schedules as AWS writes them, and the poller keeping them on a fake clock against the
stub Pudu API (real agent, real journal, memory broker)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent import settings as config
from edge_agent.pudu.schedule import parse
from tests.support.dbutil import query
from tests.support.pudu_stub import KEY, SECRET, StubServer, serve_stub
from tests.support.services import callback_server, edge_agent
from tests.support.waiting import eventually, eventually_async
from tests.test_pudu_poll import BROKER, SHOP, in_process, poll, pudu_env


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def shown(times: list[float]) -> list[str]:
    return [datetime.fromtimestamp(t, UTC).strftime("%a %Y-%m-%d %H:%M") for t in times]


def test_weekday_cron_runs_at_nine_utc_on_weekdays_only() -> None:
    schedule = parse("cron(0 9 ? * MON-FRI *)")
    friday_ten = at("2026-12-04T10:00:00")
    assert shown(schedule.upcoming(friday_ten, 4)) == [
        "Mon 2026-12-07 09:00", "Tue 2026-12-08 09:00", "Wed 2026-12-09 09:00",
        "Thu 2026-12-10 09:00"]
    # AWS numbers days 1-7 from Sunday: 2-6 is MON-FRI too.
    assert parse("cron(0 9 ? * 2-6 *)").upcoming(friday_ten, 4) == schedule.upcoming(
        friday_ten, 4)


def test_rate_is_aligned_to_the_wall_clock() -> None:
    assert shown(parse("rate(15 minutes)").upcoming(at("2026-12-04T10:07:31"))) == [
        "Fri 2026-12-04 10:15", "Fri 2026-12-04 10:30", "Fri 2026-12-04 10:45"]
    assert parse("rate(1 hour)").next_after(at("2026-12-04T10:00:00")) == at(
        "2026-12-04T11:00:00")
    assert parse(300).next_after(at("2026-12-04T10:01:00")) == at("2026-12-04T10:05:00")


def test_the_year_field_and_day_of_month_are_honoured() -> None:
    schedule = parse("cron(30 6 1 * ? 2028)")
    assert shown(schedule.upcoming(at("2026-12-04T00:00:00"), 2)) == [
        "Sat 2028-01-01 06:30", "Tue 2028-02-01 06:30"]


def test_last_weekday_of_the_month_is_aws_spelling() -> None:
    # AWS: 6L (or FRIL) is the month's last Friday; croniter spells it L5.
    friday = shown(parse("cron(0 10 ? * 6L *)").upcoming(at("2026-12-04T00:00:00")))
    assert friday == ["Fri 2026-12-25 10:00", "Fri 2027-01-29 10:00", "Fri 2027-02-26 10:00"]
    assert shown(parse("cron(0 10 ? * FRIL *)").upcoming(at("2026-12-04T00:00:00"))) == friday
    assert shown(parse("cron(0 10 ? * 1L *)").upcoming(at("2026-12-04T00:00:00"), 1)) == [
        "Sun 2026-12-27 10:00"]


def test_a_year_far_ahead_is_found_and_a_spent_year_field_ends_the_schedule() -> None:
    far = parse("cron(0 9 1 1 ? 2035)")
    assert shown(far.upcoming(at("2026-12-04T00:00:00"))) == ["Mon 2035-01-01 09:00"]
    assert "(no run time after these)" in far.describe(at("2026-12-04T00:00:00"))
    leap = parse("cron(0 9 29 2 ? 2027-2040)")  # a year without the date is skipped
    assert shown(leap.upcoming(at("2026-12-04T00:00:00"), 2)) == [
        "Tue 2028-02-29 09:00", "Sun 2032-02-29 09:00"]
    spent = parse("cron(0 9 1 * ? 2020)")  # accepted: a warning, not a refusal
    assert spent.next_after(at("2026-12-04T00:00:00")) is None
    assert spent.upcoming(at("2026-12-04T00:00:00")) == []
    assert "no run time left" in spent.describe(at("2026-12-04T00:00:00"))


@pytest.mark.parametrize(("expression", "said"), [
    ("cron(0 9 * * MON-FRI *)", "exactly one of day-of-month and day-of-week must be ?"),
    ("cron(0 9 ? * MON-FRI)", "six fields"),
    ("cron(0 25 ? * MON *)", "not a valid expression"),
    ("cron(0 9 ? * 8 *)", "outside 1-7"),
    ("cron(0 9 ? * 8L *)", "1L-7L"),
    ("cron(0 9 30 2 ? *)", "matches no date"),
    ("rate(0 minutes)", "positive"),
    ("every 5 minutes", "give rate("),
])
def test_a_bad_expression_is_refused_saying_why(expression: str, said: str) -> None:
    with pytest.raises(ValueError, match=said.replace("(", r"\(").replace("?", r"\?")):
        parse(expression)


def test_schedule_expression_is_an_alias_and_check_config_prints_the_next_runs() -> None:
    env = {"PUDU_API_URL": "us", "PUDU_API_KEY": KEY, "PUDU_API_SECRET": SECRET,
           "PUDU_SHOP_IDS": SHOP, "PUDU_CALLBACK_CODE": "c", "ORG_ID": "acme",
           "GATEWAY_ID": "gw", "PATH": "/usr/bin:/bin"}
    settings = config.load(None, {**env, "SCHEDULE_EXPRESSION": "rate(15 minutes)"})
    assert settings.pudu.schedule.period == 900
    assert any("SCHEDULE_EXPRESSION (a seed name) used" in n and "PUDU_POLL_SCHEDULE" in n
               for n in settings.source_notes)
    both = config.load(None, {**env, "SCHEDULE_EXPRESSION": "rate(15 minutes)",
                              "PUDU_POLL_SCHEDULE": "rate(1 hour)"})
    assert both.pudu.schedule.period == 3600  # the product's name wins, and says so
    assert any("SCHEDULE_EXPRESSION=rate(15 minutes) is not used" in n
               for n in both.source_notes)
    done = subprocess.run([sys.executable, "-m", "edge_agent", "check-config"],
                          env={**env, "SCHEDULE_EXPRESSION": "cron(0 9 ? * MON-FRI *)"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if "next runs" in x)
    assert line.count(" 09:00:00") == 3 and "Sat" not in line and "Sun" not in line
    bad = subprocess.run([sys.executable, "-m", "edge_agent", "check-config"],
                         env={**env, "PUDU_POLL_SCHEDULE": "cron(0 9 * * * *)"},
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "must be ?" in bad.stderr


def test_check_config_shows_a_far_run_warns_of_none_left_and_says_the_interval_wins(
        ) -> None:
    env = {"PUDU_API_URL": "us", "PUDU_API_KEY": KEY, "PUDU_API_SECRET": SECRET,
           "PUDU_SHOP_IDS": SHOP, "PUDU_CALLBACK_CODE": "c", "ORG_ID": "acme",
           "GATEWAY_ID": "gw", "PATH": "/usr/bin:/bin"}
    far = subprocess.run([sys.executable, "-m", "edge_agent", "check-config"],
                         env={**env, "PUDU_POLL_SCHEDULE": "cron(0 9 1 1 ? 2035)"},
                         capture_output=True, text=True, timeout=60, check=False)
    assert far.returncode == 0, far.stderr
    assert "Mon 2035-01-01 09:00:00" in far.stderr
    spent = subprocess.run([sys.executable, "-m", "edge_agent", "check-config"],
                           env={**env, "PUDU_POLL_SCHEDULE": "cron(0 9 1 * ? 2020)"},
                           capture_output=True, text=True, timeout=60, check=False)
    assert spent.returncode == 0, spent.stderr  # starts; the next start is not refused
    now = datetime.now(UTC).timestamp()
    settings = config.load(None, {**env, "PUDU_POLL_SCHEDULE": "cron(0 9 1 * ? 2020)"})
    assert settings.pudu.polling
    (said,) = settings.pudu.schedule_warnings(now)
    assert "no run time left" in said and "does not poll" in said
    off = config.load(None, {**env, "PUDU_POLL_SCHEDULE": "rate(15 minutes)",
                             "PUDU_POLL_INTERVAL": "0"})
    assert not off.pudu.polling  # the 0 wins, and says so
    (said,) = off.pudu.schedule_warnings(now)
    assert "PUDU_POLL_INTERVAL=0 turns scheduled polling off" in said
    assert config.load(None, {**env, "PUDU_POLL_SCHEDULE": "rate(15 minutes)"}
                       ).pudu.schedule_warnings(now) == []


class Stop(Exception):
    """Ends the poller's loop when the fake clock reaches the test's horizon."""


class FakeClock:
    """Time moves only when the poller sleeps; a sleep past ``end`` stops the schedule."""

    def __init__(self, start: float, end: float) -> None:
        self.t, self.end = start, end

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        if self.t + seconds > self.end:
            raise Stop
        self.t += seconds


@pytest.fixture
def stub() -> Iterator[StubServer]:
    yield from serve_stub()


async def scheduled_runs(tmp_path: Path, stub: StubServer, expression: str, start: float,
                         end: float, last_run: float | None = None) -> list[str]:
    """The start times (fake clock) of the runs the agent's schedule made in [start, end]."""
    stub.stub.add_robot("R1", SHOP)
    async with in_process(tmp_path, stub, PUDU_POLL_SCHEDULE=expression) as (agent, _, _s):
        if last_run is not None:  # a run before the gateway went down
            await agent.journal.save_run({"run_id": "before", "started_at": last_run,
                                          "ended_at": last_run + 1, "status": "ok"})
        agent.poller.clock = FakeClock(start, end)
        with pytest.raises(Stop):
            await agent.poller.run()
        records, _ = await agent.journal.runs(limit=100)
    return shown(sorted(r["started_at"] for r in records if r["run_id"] != "before"))


async def test_the_poller_runs_weekdays_at_nine_only(tmp_path: Path, stub: StubServer) -> None:
    runs = await scheduled_runs(tmp_path, stub, "cron(0 9 ? * MON-FRI *)",
                                at("2026-12-04T10:00:00"), at("2026-12-14T08:00:00"))
    assert runs == ["Mon 2026-12-07 09:00", "Tue 2026-12-08 09:00", "Wed 2026-12-09 09:00",
                    "Thu 2026-12-10 09:00", "Fri 2026-12-11 09:00"]


async def test_rate_runs_on_the_quarter_hours(tmp_path: Path, stub: StubServer) -> None:
    runs = await scheduled_runs(tmp_path, stub, "rate(15 minutes)", at("2026-12-04T10:07:00"),
                                at("2026-12-04T10:50:00"), last_run=at("2026-12-04T10:00:00"))
    assert runs == ["Fri 2026-12-04 10:15", "Fri 2026-12-04 10:30", "Fri 2026-12-04 10:45"]


async def test_downtime_over_run_times_makes_one_catch_up_run(tmp_path: Path,
                                                             stub: StubServer) -> None:
    # Last ran 10:00; down until 11:10 (10:15 ... 11:00 missed): one run at 11:10, then 11:15.
    runs = await scheduled_runs(tmp_path, stub, "rate(15 minutes)", at("2026-12-04T11:10:00"),
                                at("2026-12-04T11:20:00"), last_run=at("2026-12-04T10:00:00"))
    assert runs == ["Fri 2026-12-04 11:10", "Fri 2026-12-04 11:15"]


async def test_a_schedule_that_runs_out_stops_polling_and_the_agent_goes_on(
        tmp_path: Path, stub: StubServer, caplog: pytest.LogCaptureFixture) -> None:
    stub.stub.add_robot("R1", SHOP)
    async with in_process(tmp_path, stub, PUDU_POLL_SCHEDULE="cron(0 9 1 * ? 2026)") as (
            agent, client, _s):
        agent.poller.clock = FakeClock(at("2026-11-15T00:00:00"), at("2027-06-01T00:00:00"))
        await agent.poller.run()  # returns (no Stop): December 1st was the last run time
        records, _ = await agent.journal.runs(limit=10)
        assert shown([r["started_at"] for r in records]) == ["Tue 2026-12-01 09:00"]
        assert agent.poller.ended is not None and "no run time left" in agent.poller.ended
        said = [r for r in caplog.records if "no run time left" in r.getMessage()]
        assert len(said) == 1 and said[0].levelname == "WARNING"
        assert agent.poller.enabled is False and agent.health()["poll"]["enabled"] is False
        assert (await client.get("/api/pudu/webhook/health")).status_code == 200


async def test_a_spent_schedule_at_start_does_not_stop_the_agent(tmp_path: Path,
                                                                 stub: StubServer) -> None:
    """Scheduled polling on (an interval), the schedule's years over: the poller task ends
    at once, saying so; the agent serves on."""
    async with in_process(tmp_path, stub, PUDU_POLL_SCHEDULE="cron(0 9 1 * ? 2020)",
                          PUDU_POLL_INTERVAL="300") as (agent, client, _s):
        async def ended() -> bool:
            return agent.poller.ended is not None

        await eventually_async(ended, what="the schedule ended")
        assert agent.health()["poll"]["enabled"] is False and agent.poller.runs == 0
        assert "pudu-poller" not in agent.tasks.names() and not agent.tasks.crashed
        r = await client.get("/api/pudu/webhook/health")
        assert r.status_code == 200, r.text


@pytest.mark.integration
@pytest.mark.parametrize(("failing", "status"), [
    ("/v1/api/robot", "failed"),  # the shop's robot list: the shop failed
    ("/v2/status/get_by_sn", "partial"),  # every robot's status: partial, no shop failed
])
def test_a_failed_poll_run_opens_poll_failed_once_and_an_ok_run_resolves_it(
        tmp_path: Path, stub: StubServer, db_url: str, failing: str, status: str) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    stub.stub.add_robot("Q1", SHOP)
    with callback_server(tmp_path, BROKER, db_url, TOPIC_PREFIX=p), \
            edge_agent(tmp_path, BROKER, org="acme", gateway="gwq", TOPIC_PREFIX=p,
                       **pudu_env(stub, PUDU_POLL_INTERVAL="0")) as agent:
        stub.stub.fail(failing, "500", times=100)  # the Pudu API answers 500
        first = poll(agent)
        assert (first["status"], first["shops_failed"]) == (
            status, [SHOP] if status == "failed" else [])
        assert poll(agent)["status"] == status  # still failing: the same alert
        eventually(lambda: len(query(
            db_url, "SELECT 1 FROM mqtt_message_log WHERE channel = 'poll'")) == 2,
            what="2 runs stored")
        rows = eventually(lambda: query(
            db_url, "SELECT subject_id, severity, state FROM alerts WHERE rule = 'poll_failed'"),
            what="poll_failed open")
        assert [(r["subject_id"], r["state"]) for r in rows] == [("gwq", "open")]
        stub.stub.faults.clear()
        assert poll(agent)["status"] == "ok"
        resolved = eventually(lambda: query(
            db_url, "SELECT state FROM alerts WHERE rule = 'poll_failed'")[0]["state"]
            == "resolved", what="resolved")
        assert resolved
        assert len(query(db_url, "SELECT 1 FROM alerts WHERE rule = 'poll_failed'")) == 1
