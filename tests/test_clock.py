"""The ordering rule (bridge/clock.py) on its own: bad robot clocks, late retries, and a
gateway clock the robots disagree with."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import pytest

import bridge.clock
from bridge.clock import FLOOR, GatewayClock, RobotClocks, ranks_newer

NOW = 1_780_000_000.0
SKEW = 300.0


def taken(clocks: RobotClocks, stored: list[Any], ts: float | None,
          received: float, *, reference: float | None = None,
          by_received: bool = False) -> bool:
    """Order one message and merge it as the stores do; True if it moved the state."""
    o = clocks.order("R", ts, received, received if reference is None else reference,
                     by_received=by_received)
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
    assert clocks.resets == 1  # the RTC reset (1970, then 2001 counting up): once


def test_an_rtc_reset_is_counted_once_per_reset_not_per_message() -> None:
    clocks = RobotClocks(SKEW)
    assert clocks.order("R", NOW, NOW, NOW).reset is False
    first = [clocks.order("R", ts, NOW + i, NOW + i)
             for i, ts in enumerate((5.0, 6.0, 978_307_200.0, 978_307_201.0), 1)]
    assert [o.reset for o in first] == [True, False, False, False]
    assert first[0].note and "reset" in first[0].note
    assert clocks.resets == 1
    assert clocks.order("R", NOW + 10, NOW + 10, NOW + 10).reset is False  # set right
    assert clocks.order("R", 7.0, NOW + 11, NOW + 11).reset  # and reset again
    assert clocks.order("new", 8.0, NOW, NOW).reset  # first heard already reset
    assert clocks.resets == 3
    # far ahead is implausible, not a reset
    assert not clocks.order("S", NOW + 86_400, NOW, NOW).reset
    assert clocks.resets == 3


def test_untimed_messages_delivered_again_or_out_of_order_leave_the_newest() -> None:
    """Where deliveries repeat and overtake each other (the cloud), a message without a
    usable robot time received before the newest-received one never overwrites it."""
    for untimed in (None, 12.0, 978_307_200.0):  # no time, 1970, 2001: alike
        # the cloud's clock is a little after the gateway's
        take = functools.partial(taken, RobotClocks(SKEW), list[Any]([None]),
                                 reference=NOW + 2, by_received=True)
        assert take(NOW - 20, NOW - 20)
        assert take(untimed, NOW) and take(untimed, NOW + 5)
        assert not take(untimed, NOW)       # a1 delivered again after a2
        assert take(untimed, NOW + 5)       # a2 again: the same state
        assert not take(untimed, NOW + 3)   # one received between them, arriving last
        assert take(NOW + 8, NOW + 8)       # then a sane time
        assert not take(untimed, NOW + 6)   # received before it: older
        assert take(untimed, NOW + 9)


def test_untimed_messages_of_a_robot_never_timed_are_ranked_by_their_receipt() -> None:
    clocks, stored = RobotClocks(SKEW), list[Any]([None])
    # the cloud orders each by its own clock at the time; received_at ranks them
    assert taken(clocks, stored, None, NOW, reference=NOW + 1, by_received=True)
    assert taken(clocks, stored, None, NOW + 5, reference=NOW + 6, by_received=True)
    assert not taken(clocks, stored, None, NOW, reference=NOW + 7, by_received=True)


def test_on_the_edge_untimed_messages_are_ranked_as_they_come() -> None:
    """The edge orders each callback as it receives it: a Pudu retry is news again."""
    clocks, stored = RobotClocks(SKEW), list[Any]([None])
    assert taken(clocks, stored, NOW - 20, NOW - 20)
    assert taken(clocks, stored, None, NOW + 5)
    assert taken(clocks, stored, None, NOW)  # the gateway's clock stepped back 5 s


def test_a_gateway_clock_set_back_is_followed_for_untimed_messages_once_confirmed() -> None:
    clocks, stored = RobotClocks(SKEW), list[Any]([None])
    for i in range(3):
        assert taken(clocks, stored, None, NOW + i, reference=NOW + i, by_received=True)
    back = NOW - 3600  # the gateway's clock set back an hour, and staying there
    results = [taken(clocks, stored, None, back + 10 + i, reference=NOW + 10 + i,
                     by_received=True) for i in range(5)]
    assert results == [False, False, True, True, True]
    # a single message redelivered an hour late is not taken for it
    clocks, stored = RobotClocks(SKEW), list[Any]([None])
    assert taken(clocks, stored, None, NOW, reference=NOW, by_received=True)
    assert not taken(clocks, stored, None, NOW - 3600, reference=NOW + 1, by_received=True)
    assert taken(clocks, stored, None, NOW + 2, reference=NOW + 2, by_received=True)
    assert not taken(clocks, stored, None, NOW - 3599, reference=NOW + 3, by_received=True)


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
    gw.observe("C", 20.0, behind + 1)  # a reset robot says nothing
    assert not gw.wrong  # one robot alone cannot tell whose clock is wrong
    assert gw.undecided("A", NOW, behind + 1)
    gw.observe("B", NOW + 1, behind + 1)  # two robots agreeing: two clocks against one
    assert gw.wrong and abs(gw.offset - 3600) < 1
    assert not gw.undecided("A", NOW + 2, behind + 2)
    assert gw.undecided("A", NOW, behind + 2 + gw.window)  # B not heard for too long
    gw.observe("D", NOW + 2, behind + 2)
    assert gw.wrong and abs(gw.offset - 3600) < 1
    assert abs(gw.reference(behind + 3) - (NOW + 3)) < 1
    # of two robots, one agreeing with the gateway: the other's clock is the wrong one
    two = GatewayClock(SKEW)
    two.observe("A", NOW, NOW)
    two.observe("B", NOW + 3600, NOW)
    assert not two.wrong and not two.undecided("B", NOW + 3600, NOW)
    # two robots that disagree with each other make no verdict either
    apart = GatewayClock(SKEW)
    apart.observe("A", NOW + 3600, NOW)
    apart.observe("B", NOW + 7200, NOW)
    assert not apart.wrong
    # a time after CEILING is garbage, not a clock: the robot is named even alone
    alone = GatewayClock(SKEW)
    alone.observe("A", 9_999_999_999.0, NOW)
    assert not alone.undecided("A", 9_999_999_999.0, NOW) and not alone.wrong
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
