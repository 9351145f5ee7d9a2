"""The ordering rule (bridge/clock.py) on its own: bad robot clocks, late retries, and a
gateway clock the robots disagree with."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

import bridge.clock
from bridge.clock import FLOOR, GatewayClock, RobotClocks, ranks_newer

NOW = 1_780_000_000.0
SKEW = 300.0


def taken(clocks: RobotClocks, stored: list[Any], ts: float | None,
          received: float) -> bool:
    """Order one message and merge it as the stores do; True if it moved the state."""
    o = clocks.order("R", ts, received, received)
    if ranks_newer(o.order, stored[0]):
        stored[0] = o.order
        return True
    return False


def test_a_reset_clock_is_followed_and_late_retries_are_not() -> None:
    clocks, stored = RobotClocks(SKEW), list[Any]([None])
    assert all(taken(clocks, stored, NOW + i, NOW + i) for i in range(5))
    # 1970 and 2001 (counting up) are implausible: ordered as untimed, each followed
    assert taken(clocks, stored, 12.0, NOW + 10)
    assert all(taken(clocks, stored, 978_307_200.0 + i, NOW + 11 + i) for i in range(5))
    # a late retry of an old message (robot and gateway time both old) changes nothing
    assert not taken(clocks, stored, NOW + 1, NOW + 1)
    # one late retry long after (robot time old, received now) is not a reset
    assert not taken(clocks, stored, NOW + 2, NOW + 3000)
    assert taken(clocks, stored, NOW + 3001, NOW + 3001)
    assert clocks.resets == 0


def test_a_plausible_clock_going_back_is_a_reset_after_several_messages() -> None:
    clocks, stored = RobotClocks(SKEW), list[Any]([None])
    assert taken(clocks, stored, NOW, NOW)
    back = NOW - 86_400  # set back a day, and staying there
    results = [taken(clocks, stored, back + i, NOW + 1 + i) for i in range(6)]
    assert results == [False, False, True, True, True, True]
    assert clocks.resets == 1
    # its own times rank anew once its clock is right again
    assert taken(clocks, stored, NOW + 100, NOW + 100)
    assert stored[0] == NOW + 100


def test_far_future_then_sane_in_the_same_second_the_sane_one_wins() -> None:
    clocks, stored = RobotClocks(SKEW), list[Any]([None])
    assert taken(clocks, stored, NOW - 5, NOW - 5)
    o = clocks.order("R", 9_999_999_999.0, NOW + 0.7, NOW + 0.7)
    assert o.implausible and o.note and "ahead" in o.note
    assert ranks_newer(o.order, stored[0])
    stored[0] = o.order
    assert taken(clocks, stored, NOW, NOW + 0.9)  # whole-second robot time, same second


def test_an_untimed_message_never_outranks_a_lagging_sane_one() -> None:
    clocks, stored = RobotClocks(SKEW), list[Any]([None])
    assert taken(clocks, stored, None, NOW)        # a robot not seen yet, untimed
    assert taken(clocks, stored, NOW - 2, NOW + 1)  # its clock lags the gateway's by 3 s
    assert taken(clocks, stored, None, NOW + 2)
    assert taken(clocks, stored, NOW - 1, NOW + 3)


def test_the_gateway_clock_is_the_odd_one_out_only_when_most_robots_say_so() -> None:
    gw = GatewayClock(SKEW)
    behind = NOW - 3600  # the gateway's clock, an hour behind
    gw.observe("A", NOW, behind)
    gw.observe("B", NOW + 1, behind + 1)
    assert not gw.wrong  # two robots are not a quorum
    gw.observe("C", 20.0, behind + 2)  # a reset robot says nothing
    gw.observe("D", NOW + 2, behind + 2)
    assert gw.wrong and abs(gw.offset - 3600) < 1
    assert abs(gw.reference(behind + 3) - (NOW + 3)) < 1
    # one robot far ahead among right ones does not make the gateway wrong
    ok = GatewayClock(SKEW)
    for name, ts in (("A", NOW), ("B", NOW), ("C", NOW + 7200)):
        ok.observe(name, ts, NOW)
    assert not ok.wrong
    assert FLOOR < NOW


def test_a_gateway_of_more_robots_than_it_remembers_estimates_once_a_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """1,001 robots through a memory of 1,000: each is new again when it next speaks.
    An estimate reads every robot kept; it is still made at most once a second (it was
    made on nearly every message), and still finds the gateway an hour behind."""
    seconds = [0.0]
    monkeypatch.setattr(bridge.clock, "time", SimpleNamespace(monotonic=lambda: seconds[0]))
    made = [0]
    estimate = GatewayClock._estimate

    def counted(self: GatewayClock, now: float) -> float:
        made[0] += 1
        return estimate(self, now)

    monkeypatch.setattr(GatewayClock, "_estimate", counted)
    gw = GatewayClock(SKEW)
    behind = NOW - 3600
    for i in range(5 * 1001):  # five seconds of 1,001 messages, one per robot
        seconds[0] = i / 1001
        gw.observe(f"R{i % 1001}", NOW + i / 1001, behind + i / 1001)
        gw.reference(behind + i / 1001)  # what each accepted callback asks
    assert made[0] <= gw.quorum + 5
    assert gw.wrong and abs(gw.offset - 3600) < 1


def test_old_data_and_late_retries_do_not_make_the_gateway_clock_wrong() -> None:
    gw = GatewayClock(SKEW)
    # robots replaying data of a year ago, each its own time: scattered, not a clock
    for i, name in enumerate("ABCDE"):
        gw.observe(name, NOW - 365 * 86400 + i * 7200, NOW)
    assert not gw.wrong
    right = GatewayClock(SKEW)
    for name in "ABCD":
        right.observe(name, NOW, NOW)
        right.observe(name, NOW - 7200, NOW + 1)  # a late retry of an old message each
    assert not right.wrong
