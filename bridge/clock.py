"""One ordering rule per robot that survives bad clocks (docs/clocks.md).

State is merged never-backwards so that retries and late deliveries of old messages
never overwrite newer state. Ordering by the robot's own clock alone freezes a robot
whose clock is wrong, so each message gets an *order* (the value the edge's downsampler
and outbox, and the cloud's per-group watermarks, compare) from ``RobotClocks.order``:

- a robot time before ``FLOOR`` (the product's first release) or more than the skew
  bound ahead of the reference clock is *implausible*: it is not used, and the message
  is ordered like one without a robot time;
- a robot time before ``FLOOR`` is a reset RTC: counted once per robot until it sends a
  plausible time again;
- a message without a (usable) robot time ranks equal to the robot's newest order, so it
  is taken (equal ranks go to the newer received) but never outranks a later message
  with a sane time; for a robot not seen yet it ranks ``reference - max_skew``, so a
  robot clock lagging the reference by less than the bound still moves the state. Where
  messages can arrive again or out of order (the cloud: ``by_received``), one received
  by the gateway before the robot's newest-received message ranks below that one by as
  much as it was received earlier, so a redelivered or reordered one never wins a tie;
- robot times that jump back by more than ``reset_bound`` against the receiving clock and
  *stay* there for ``confirm`` consecutive messages are a clock reset: from then on the
  robot's times are shifted onto its old timeline (state follows the newest received),
  the jump is noted and counted. One late message (a retry) is never taken for a reset:
  it is followed by a current one, which clears the count.

``ranks_newer`` is the single comparison of an order with a stored one, for the edge
(downsampling, supersession), the cloud merge (the SQL upsert states the same
``new >= stored``) and any other consumer (pluggable: call it, do not re-derive it).
``GatewayClock`` checks the gateway's clock against its robots' clocks.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Final

__all__ = ["CEILING", "CONFIRM", "FLOOR", "MAX_SKEW_SECONDS", "RESET_BOUND_SECONDS", "GatewayClock",
           "Ordering", "RobotClocks", "plausible", "ranks_newer"]

#: 2017-01-01 UTC: before Pudu's first robots shipped; a robot time before it is an RTC
#: that reset (1970, 2000, 2001 ...), not a time to order by.
FLOOR: Final = dt.datetime(2017, 1, 1, tzinfo=dt.UTC).timestamp()
#: 2100-01-01 UTC: a robot time after it is garbage (a unit mix-up, a corrupt RTC), not a
#: clock running ahead; it says nothing about the gateway's clock either.
CEILING: Final = dt.datetime(2100, 1, 1, tzinfo=dt.UTC).timestamp()
#: How far ahead of the receiving clock a robot time may be and still be ordered by: the
#: default of both services' MAX_CLOCK_SKEW_SECONDS and of every ``max_skew`` parameter.
MAX_SKEW_SECONDS: Final = 300.0
#: How far back (against the receiving clock) a robot's times must jump to be a reset.
RESET_BOUND_SECONDS: Final = 600.0
#: Consecutive messages that must agree on the jumped-back clock before it is a reset.
CONFIRM: Final = 3
#: Robots whose ordering state is kept (the least recently heard are dropped beyond it).
CAPACITY: Final = 200_000


def ranks_newer(new: float, stored: float | None) -> bool:
    """Does an order of ``new`` rank at least as new as the ``stored`` one? Ties go to
    the message received later, so a retry of the same message changes nothing and an
    untimed message (ranked equal) is taken."""
    return stored is None or new >= stored


def plausible(ts: float | None, reference: float, max_skew: float) -> bool:
    """A robot time worth ordering by: finite, after ``FLOOR``, and at most ``max_skew``
    seconds ahead of ``reference`` (a clock known to be right, or corrected)."""
    return ts is not None and math.isfinite(ts) and FLOOR <= ts <= reference + max_skew


@dataclass(frozen=True, slots=True)
class Ordering:
    """What one message ranks by, and why when it is not its robot time."""

    order: float
    #: The robot time used (None: none usable, ordered as untimed).
    robot_time: float | None
    #: Set when the robot time was not used as sent (implausible, or a reset).
    note: str | None = None
    #: This message confirmed a clock reset, or is the first of its robot with a time
    #: before ``FLOOR`` (count it, raise ``robot_clock``).
    reset: bool = False
    #: The robot time was implausible (before FLOOR or too far ahead).
    implausible: bool = False


class _Clock:
    __slots__ = ("candidates", "late", "late_lag", "lead", "newest", "offset", "received",
                 "received_order", "rtc_reset", "since_lead")

    def __init__(self) -> None:
        self.newest: float | None = None   # the newest order taken
        self.lead: float | None = None     # received - robot time of that message
        self.offset = 0.0                  # added to robot times after a reset
        self.candidates = 0                # consecutive messages behind by > the bound
        self.since_lead: float | None = None  # their lead
        self.rtc_reset = False             # its last time was before FLOOR (counted)
        # by_received only: the newest receive time (the gateway's clock) ordered, and
        # the order that message was given
        self.received: float | None = None
        self.received_order = 0.0
        self.late = 0                      # consecutive messages received > the bound before it
        self.late_lag: float | None = None  # their reference - received


class RobotClocks:
    """Per-robot ordering state (bounded); ``order`` applies the rule to one message."""

    def __init__(self, max_skew: float, *, reset_bound: float = RESET_BOUND_SECONDS,
                 confirm: int = CONFIRM, capacity: int = CAPACITY) -> None:
        self.max_skew = max_skew
        self.reset_bound = reset_bound
        self.confirm = max(2, confirm)
        self.capacity = capacity
        self.resets = 0
        self._clocks: OrderedDict[Hashable, _Clock] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clocks)

    def forget(self, robot: Hashable) -> None:
        self._clocks.pop(robot, None)

    def _clock(self, robot: Hashable) -> _Clock:
        clock = self._clocks.get(robot)
        if clock is None:
            clock = self._clocks[robot] = _Clock()
            while len(self._clocks) > self.capacity:
                self._clocks.popitem(last=False)
        else:
            self._clocks.move_to_end(robot)
        return clock

    def order(self, robot: Hashable, ts: float | None, received: float,
              reference: float, *, by_received: bool = False) -> Ordering:
        """The order of a message of ``robot`` with robot time ``ts`` (None: none),
        received at ``received`` (the receiving clock, whatever its error) where the
        trusted (or corrected) time is ``reference``.

        ``by_received``: messages may arrive again or out of the order they were
        received in (the cloud; the edge orders each callback as it is received), so
        ``received`` ranks the ones without a usable robot time among themselves."""
        c = self._clock(robot)
        late = by_received and self._late(c, received, reference)
        if not plausible(ts, reference, self.max_skew):
            o = self._untimed(c, ts, reference, count=not late)
            if late:
                assert c.received is not None
                # received before the newest-received message: ranked below it by as much
                # as it was received earlier, so it never wins the tie a retry would
                below = c.received_order - (c.received - received)
                o = replace(o, order=min(below, math.nextafter(c.received_order, -math.inf)))
        else:
            assert ts is not None
            c.rtc_reset = c.rtc_reset and late  # set right (a late one says nothing now)
            o = self._timed(c, ts, received)
        if by_received and not late:
            c.received, c.received_order = received, o.order
        return o

    def _late(self, c: _Clock, received: float, reference: float) -> bool:
        """Was this message received (by the gateway's clock) before the robot's newest
        received one? A run of ``confirm`` received more than ``reset_bound`` before it,
        agreeing on how far the gateway's clock lags ``reference``, is that clock set
        back, not late news: from then on its times rank anew."""
        if c.received is None or received >= c.received:
            c.late = 0
            return False
        if c.received - received <= self.reset_bound:
            return True  # a redelivery, or a message overtaken on the way
        lag = reference - received
        same = c.late_lag is not None and abs(lag - c.late_lag) <= self.reset_bound
        c.late = c.late + 1 if same else 1
        c.late_lag = c.late_lag if same else lag
        if c.late < self.confirm:
            return True
        c.late = 0
        return False

    def _untimed(self, c: _Clock, ts: float | None, reference: float, *,
                 count: bool = True) -> Ordering:
        """A message without a usable robot time: ranked equal to the robot's newest.
        A first time before ``FLOOR`` is counted as a reset unless ``count`` is False
        (a late delivery says nothing about the clock now)."""
        note, reset = None, False
        if ts is not None and math.isfinite(ts):
            if ts < FLOOR:
                why = f"before {dt.datetime.fromtimestamp(FLOOR, dt.UTC):%Y-%m-%d}"
                reset = count and not c.rtc_reset
                c.rtc_reset = c.rtc_reset or count
            else:
                why = (f"{ts - reference:.0f} s ahead of the clock "
                       f"(limit {self.max_skew:g} s)")
            note = (f"ts: robot time {ts!r} is implausible ({why}); ordered as a "
                    "message without a robot time")
            if reset:
                self.resets += 1
                note += "; the robot's clock was reset (counted once until it is set right)"
        order = c.newest if c.newest is not None else reference - self.max_skew
        return Ordering(order, None, note, reset=reset, implausible=note is not None)

    def _timed(self, c: _Clock, ts: float, received: float) -> Ordering:
        """A message with a plausible robot time: ordered by it, on its old timeline
        after a confirmed reset."""
        if c.offset and ranks_newer(ts, c.newest):
            c.offset = 0.0  # the clock was set right again: its own times rank anew
        t = ts + c.offset
        lead = received - ts
        if ranks_newer(t, c.newest):
            c.newest, c.lead, c.candidates = t, lead, 0
            return Ordering(t, ts)
        assert c.newest is not None
        if c.lead is None or lead - c.lead <= self.reset_bound:
            c.candidates = 0  # late by its own clock and by the receiving one: old news
            return Ordering(t, ts)
        # Behind by more than the bound against the receiving clock: a retry long after
        # the fact, or a clock that went back. Only a run of them that agree is a reset.
        same = c.since_lead is not None and abs(lead - c.since_lead) <= self.reset_bound
        c.candidates = c.candidates + 1 if same else 1
        c.since_lead = lead if not same else c.since_lead
        if c.candidates < self.confirm:
            return Ordering(t, ts)
        back = c.newest - t
        c.offset += back
        c.lead, c.candidates = lead, 0
        self.resets += 1
        note = (f"ts: the robot's clock went back {back:.0f} s ({self.confirm} messages "
                f"in a row); its times are ordered after its last state from now on")
        return Ordering(c.newest, ts, note, reset=True)


class GatewayClock:
    """Is the gateway's clock the odd one out? Each robot's latest ``robot - gateway``
    difference is kept; when most recently heard robots (at least ``quorum``) disagree
    with the gateway by more than the bound *in the same direction*, and agree with one
    another, the gateway's clock is taken to be off by their median, and ``reference``
    corrects it. Two robots are enough: both off by the same offset are two clocks
    against one. One robot alone cannot tell whose clock is wrong (``undecided``)."""

    #: Seconds between two estimates. An estimate reads every robot's difference
    #: (~1,000): made on each message it was a quarter of the edge's CPU per accepted
    #: callback. Only the first ``quorum`` robots are counted at once (two make a
    #: verdict without waiting); a robot new among more waits like the rest. Counted at
    #: once, the robots of a gateway of more than ``capacity`` (each forgotten and met
    #: again on nearly every message) cost an estimate a message: 13 µs with 1,001.
    EVERY_SECONDS = 1.0

    def __init__(self, max_skew: float, *, quorum: int = 2, window: float = 3600.0,
                 capacity: int = 1000) -> None:
        self.max_skew = max_skew
        self.quorum = quorum
        self.window = window
        self.capacity = capacity
        self._diffs: OrderedDict[Hashable, tuple[float, float, float]] = OrderedDict()
        self._offset = 0.0
        self._latest = 0.0  # the gateway time of the last observation: what an estimate is as of
        self._stale = False
        self._estimated_at = -math.inf  # time.monotonic() of the last estimate

    @property
    def offset(self) -> float:
        """The gateway clock's error, as of the last estimate (at most EVERY_SECONDS old
        while messages change it)."""
        if self._stale and time.monotonic() - self._estimated_at >= self.EVERY_SECONDS:
            self._refresh()
        return self._offset

    def _refresh(self) -> None:
        self._offset = self._estimate(self._latest)
        self._stale = False
        self._estimated_at = time.monotonic()

    def observe(self, robot: Hashable, ts: float | None, received: float) -> None:
        """A message of ``robot`` with robot time ``ts`` at gateway time ``received``.
        Only a robot's newest time counts: a late retry of an old message says nothing
        about the clocks."""
        if ts is None or not math.isfinite(ts) or not FLOOR <= ts < CEILING:
            return
        kept = self._diffs.get(robot)
        if kept is not None and ts < kept[2] and received - kept[1] <= self.window:
            return
        self._diffs[robot] = (ts - received, received, ts)
        self._diffs.move_to_end(robot)
        while len(self._diffs) > self.capacity:
            self._diffs.popitem(last=False)
        self._latest = received
        if kept is None and len(self._diffs) <= self.quorum:
            self._refresh()
        else:
            self._stale = True

    def _estimate(self, now: float) -> float:
        """Most robots off by more than the bound in one direction, and agreeing with one
        another (a wrong gateway clock shifts them all alike; old data scatters)."""
        recent = [d for d, at, _ in self._diffs.values() if now - at <= self.window]
        if len(recent) < self.quorum:
            return 0.0
        ahead = [d for d in recent if d > self.max_skew]
        behind = [d for d in recent if d < -self.max_skew]
        for side in (ahead, behind):
            if len(side) * 2 > len(recent):
                middle = float(statistics.median(side))
                agreeing = [d for d in side if abs(d - middle) <= self.max_skew]
                if len(agreeing) * 2 > len(recent):
                    return middle
        return 0.0

    def undecided(self, robot: Hashable, ts: float, now: float) -> bool:
        """Does the robot time ``ts`` of ``robot``, disagreeing with the gateway's clock,
        leave open which of the two clocks is wrong? So when no other robot was heard
        (with a usable time) within the window, unless ``ts`` is after ``CEILING``.
        Called only for a robot time that disagrees (rare): the newest heard are
        looked at first, so it stops at once on a site of several robots."""
        if ts >= CEILING:
            return False
        for other, (_, at, _) in reversed(self._diffs.items()):
            if now - at > self.window:
                return True
            if other != robot:
                return False
        return True

    @property
    def wrong(self) -> bool:
        return self.offset != 0.0

    @property
    def correction(self) -> float:
        """What the plausibility bound adds to the gateway's time: the offset when the
        gateway is behind its robots (a box without NTP or RTC battery); nothing when it
        is ahead, which makes no robot time look too far ahead (and replayed old data
        looks the same way: it is reported, never acted on)."""
        return max(self.offset, 0.0)

    def reference(self, received: float) -> float:
        """The gateway's time ``received`` corrected by the robots' verdict."""
        return received + self.correction
