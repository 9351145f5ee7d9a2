"""eventually(): the one way a test waits, so its failures must say what was awaited."""

from __future__ import annotations

import itertools

import pytest

from tests.support.waiting import NotYet, eventually, eventually_async


def test_returns_the_first_accepted_value() -> None:
    counter = itertools.count()
    assert eventually(lambda: next(counter), accept=lambda n: n >= 3, within=5) == 3


def test_none_and_false_are_not_yet() -> None:
    answers = iter([None, 0, "", "ready"])
    assert eventually(lambda: next(answers), within=5) == "ready"


def test_a_failure_names_what_was_awaited_and_the_last_value() -> None:
    with pytest.raises(NotYet, match=r"robot R1 stored not met within 0.05 s; last value: 41"):
        eventually(lambda: 41, accept=lambda n: n == 42, within=0.05, what="robot R1 stored")


def test_not_yet_is_a_timeout_error() -> None:
    with pytest.raises(TimeoutError):
        eventually(lambda: False, within=0.05)


def test_ignored_errors_are_not_yet_and_others_propagate() -> None:
    attempts = iter([ConnectionRefusedError("starting"), ConnectionRefusedError("starting")])

    def connect() -> str:
        error = next(attempts, None)
        if error is not None:
            raise error
        return "up"

    assert eventually(connect, ignoring=(OSError,), within=5) == "up"
    with pytest.raises(NotYet, match=r"last error: ConnectionRefusedError\('down'\)"):
        eventually(lambda: (_ for _ in ()).throw(ConnectionRefusedError("down")),
                   ignoring=(OSError,), within=0.05)
    with pytest.raises(ValueError, match="not a wait"):  # not in ignoring: at once
        eventually(lambda: (_ for _ in ()).throw(ValueError("not a wait")), within=5)


def test_a_long_last_value_shows_its_end() -> None:
    log = "x" * 5000 + "the line that matters"
    with pytest.raises(NotYet) as raised:
        eventually(lambda: log, accept=lambda text: "ready" in text, within=0.05)
    assert "the line that matters" in str(raised.value) and len(str(raised.value)) < 1700


async def test_the_async_twin_awaits_a_coroutine_check_and_lets_the_loop_run() -> None:
    seen: list[int] = []

    async def count() -> int:
        seen.append(len(seen))
        return len(seen)

    assert await eventually_async(count, accept=lambda n: n >= 3, within=5) == 3
    assert await eventually_async(lambda: len(seen), within=5) == 3  # a plain function too
    with pytest.raises(NotYet, match="three and a half"):
        await eventually_async(count, accept=lambda n: n == 3.5, within=0.05,
                               what="three and a half")
