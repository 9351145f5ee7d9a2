"""When the poller runs: AWS EventBridge schedule expressions, as the replaced systems set them.

``rate(15 minutes)`` runs at wall-clock multiples of the period (UTC epoch aligned: :00, :15,
:30, :45), so gateways and restarts agree on the run times. ``cron(0 9 ? * MON-FRI *)`` is
AWS's six-field cron: minutes hours day-of-month month day-of-week year, all UTC, with ``?``
in one of the two day fields, day-of-week 1-7 = SUN-SAT (or names), and a year field. The
five standard fields go to croniter; the year field and AWS's day numbering are adapted here.
A bare number of seconds (the older ``PUDU_POLL_INTERVAL``) is ``rate`` of that many seconds.

croniter (and dateutil, which it imports: ~0.4 MiB) is imported by the first cron()
schedule, not by the module: every edge imports this through its settings, and most never
poll on a cron().

Catch-up: the poller asks for the first run time after its last run; one in the past means
a run was missed (gateway down, a run overran) and it runs once now, not once per missed time.

A year field can run out (``cron(0 9 1 * ? 2027)`` after 2027): ``next_after`` then answers
None and the poller stops polling, the agent going on. Only a pattern that never matches
in any year (``cron(0 9 30 2 ? *)``) is refused.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "Schedule", "SystemClock", "parse"]

_RATE = re.compile(r"^rate\(\s*(\d+)\s+(second|minute|hour|day)s?\s*\)$", re.IGNORECASE)
_CRON = re.compile(r"^cron\((.*)\)$", re.IGNORECASE)
_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_YEAR = re.compile(r"^(\*|\d{4}(-\d{4})?(/\d+)?)$")
#: AWS's last year (its year field takes 1970-2199); an open ``2030/2`` stops there.
LAST_YEAR = 2199
#: AWS day-of-week names, for ``FRIL`` (last Friday) as AWS's ``6L``.
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


class Clock(Protocol):
    """Wall-clock time and waiting for it: the poller's, replaceable by a test's."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """UTC epoch seconds and asyncio's sleep."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class Schedule:
    """A parsed expression; ``next_after`` is the whole interface the poller needs."""

    expression: str
    period: float | None = None  # rate: seconds between runs
    cron: str | None = None  # croniter's five fields
    years: frozenset[int] | None = None  # None: every year

    def next_after(self, when: float) -> float | None:
        """The first run time strictly after ``when`` (epoch seconds, UTC); None when the
        year field has no year left with a run time (the schedule has ended)."""
        if self.period is not None:
            return (when // self.period + 1) * self.period
        assert self.cron is not None
        start = datetime.fromtimestamp(when, UTC)
        if self.years is None:
            return _cron_next(self.cron, start)
        # Each listed year from the current one, started at its first second: a year
        # decades ahead costs one croniter step, not a walk through every run before it.
        for year in sorted(y for y in self.years if y >= start.year):
            begin = max(start, datetime(year, 1, 1, tzinfo=UTC) - timedelta(seconds=1))
            nxt = _cron_next(self.cron, begin)
            if nxt is not None and datetime.fromtimestamp(nxt, UTC).year == year:
                return nxt
        return None

    def upcoming(self, when: float, count: int = 3) -> list[float]:
        """The next ``count`` run times after ``when`` (check-config prints them); fewer
        when the schedule ends before."""
        times: list[float] = []
        for _ in range(count):
            nxt = self.next_after(when)
            if nxt is None:
                break
            times.append(when := nxt)
        return times

    def describe(self, when: float, count: int = 3) -> str:
        """What check-config prints: the next run times, or that there are none left."""
        times = self.upcoming(when, count)
        if not times:
            return f"poll schedule {self.expression}: no run time left (polling stops)"
        shown = ", ".join(datetime.fromtimestamp(t, UTC).strftime("%a %Y-%m-%d %H:%M:%S")
                          for t in times)
        last = "" if len(times) == count else " (no run time after these)"
        return f"poll schedule {self.expression}: next runs (UTC) {shown}{last}"


def _cron_next(five: str, start: datetime) -> float | None:
    """croniter's next match after ``start``; None if it finds none (it gives up after
    decades without a match: a 30 February)."""
    from croniter import CroniterBadDateError, croniter  # only cron() needs it (docstring)

    try:
        nxt: datetime = croniter(five, start).get_next(datetime)
    except CroniterBadDateError:
        return None
    return nxt.timestamp()


def _dow(field: str) -> str:
    """AWS numbers days 1-7 from Sunday; croniter 0-6. Names pass unchanged; ``#`` keeps its
    occurrence number; AWS's ``6L`` / ``FRIL`` (the month's last Friday) is croniter's
    ``L5``; ``L`` alone is Saturday, as in AWS."""
    def shift(match: re.Match[str]) -> str:
        day = int(match.group(0))
        if not 1 <= day <= 7:
            raise ValueError(f"day-of-week {day} is outside 1-7")
        return str(day - 1)

    if field == "L":
        return "6"  # AWS: L alone in day-of-week is Saturday
    last = re.fullmatch(r"(\d+|[A-Z]{3})L", field)
    if last:
        day = last.group(1)
        number = _DAYS.index(day) + 1 if day in _DAYS else int(day) if day.isdigit() else 0
        if not 1 <= number <= 7:
            raise ValueError(f"day-of-week {field!r}: give 1L-7L or SUNL-SATL")
        return f"L{number - 1}"
    head, sep, nth = field.partition("#")
    return re.sub(r"(?<![/\w])\d+", shift, head) + sep + nth


def _years(field: str) -> frozenset[int] | None:
    if field == "*":
        return None
    years: set[int] = set()
    for part in field.split(","):
        if not _YEAR.match(part):
            raise ValueError(f"year field {field!r}: give *, 2030, 2030-2035, 2030/2 or a list")
        span, _, step = part.partition("/")
        first, _, last = span.partition("-")
        stop = int(last) if last else (int(first) if not step else LAST_YEAR)
        years.update(range(int(first), stop + 1, int(step) if step else 1))
    return frozenset(years)


def parse(expression: str | float) -> Schedule:
    """``rate(...)``, ``cron(...)`` or seconds; raises ValueError saying what is wrong."""
    if isinstance(expression, int | float) or re.fullmatch(r"\s*\d+(\.\d+)?\s*", str(expression)):
        seconds = float(expression)
        if seconds <= 0:
            raise ValueError("an interval must be positive (0 turns polling off elsewhere)")
        return Schedule(expression=f"rate({seconds:g} seconds)", period=seconds)
    text = str(expression).strip()
    rate = _RATE.match(text)
    if rate:
        amount = int(rate.group(1))
        if amount < 1:
            raise ValueError("rate() needs a positive value")
        return Schedule(expression=text, period=float(amount * _UNITS[rate.group(2).lower()]))
    cron = _CRON.match(text)
    if not cron:
        raise ValueError("give rate(N minutes|hours|days) or cron(min hour dom month dow year)")
    fields = cron.group(1).split()
    if len(fields) != 6:
        raise ValueError(f"cron() takes six fields (min hour day-of-month month day-of-week "
                         f"year), got {len(fields)}")
    minute, hour, dom, month, dow, year = fields
    if (dom == "?") == (dow == "?"):
        raise ValueError("cron(): exactly one of day-of-month and day-of-week must be ?")
    if "W" in dom.upper():
        raise ValueError("cron(): the W (nearest weekday) form is not supported")
    five = " ".join((minute, hour, "*" if dom == "?" else dom, month,
                     "*" if dow == "?" else _dow(dow.upper())))
    from croniter import croniter  # only cron() schedules need it (module docstring)

    if not croniter.is_valid(five):
        raise ValueError(f"cron(): {cron.group(1)!r} is not a valid expression")
    # A pattern no year matches (30 February) is refused; one whose listed years are over
    # is not: check-config warns and the poller stops (module docstring).
    if _cron_next(five, datetime(1970, 1, 1, tzinfo=UTC)) is None:
        raise ValueError(f"cron(): {cron.group(1)!r} matches no date")
    return Schedule(expression=text, cron=five, years=_years(year))
