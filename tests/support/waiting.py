"""Waiting for a condition: polled against a deadline, never a fixed sleep.

``eventually`` (threads, subprocesses, HTTP) and ``eventually_async`` (code on the test's
event loop, which must keep running while we wait) are the one way a test waits for
something it cannot await directly. Where an event can be awaited (an MQTT message through
``Probe.wait_for``), await that instead.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

EVERY = 0.02  # seconds between checks: short, so a test waits no longer than it must
WITHIN = 20.0  # seconds: generous, since it is spent only when the test fails anyway
SHOWN = 1500  # characters of the last value a failure shows


class NotYet(TimeoutError):
    """The awaited condition did not hold by the deadline; the message says what it was.

    A ``TimeoutError``, which is what a wait that ran out of time raises everywhere else.
    """


def _expired(what: str | None, within: float, last: object, error: BaseException | None) -> NotYet:
    said = what or "condition"
    seen = repr(error) if error is not None else repr(last)
    if len(seen) > SHOWN:
        seen = "..." + seen[-SHOWN:]  # the end of a log is where the news is
    tail = f"; last error: {seen}" if error is not None else f"; last value: {seen}"
    return NotYet(f"{said} not met within {within:g} s{tail}")


@overload
def eventually(check: Callable[[], T | None], *, within: float = WITHIN, what: str | None = None,
               accept: None = None, ignoring: tuple[type[BaseException], ...] = (),
               every: float = EVERY) -> T: ...


@overload
def eventually(check: Callable[[], T], *, within: float = WITHIN, what: str | None = None,
               accept: Callable[[T], object], ignoring: tuple[type[BaseException], ...] = (),
               every: float = EVERY) -> T: ...


def eventually(check: Callable[[], Any], *, within: float = WITHIN, what: str | None = None,
               accept: Callable[[Any], object] | None = None,
               ignoring: tuple[type[BaseException], ...] = (), every: float = EVERY) -> Any:
    """Return ``check()``'s first result that ``accept`` (default: truthiness, so never a
    None) holds for; ``NotYet`` naming ``what`` past ``within`` s, with the last value seen.

    An exception in ``ignoring`` (a service still starting: ``OSError``) counts as "not yet".
    """
    accept = accept or bool
    deadline = time.monotonic() + within
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value = check()
            last, error = value, None
            if accept(value):
                return value
        except ignoring as exc:
            error = exc
        if time.monotonic() > deadline:
            raise _expired(what, within, last, error)
        time.sleep(every)


@overload
async def eventually_async(check: Callable[[], Awaitable[T]], *, within: float = WITHIN,
                           what: str | None = None,
                           accept: Callable[[T], object] = bool,
                           ignoring: tuple[type[BaseException], ...] = (),
                           every: float = EVERY) -> T: ...


@overload
async def eventually_async(check: Callable[[], T], *, within: float = WITHIN,
                           what: str | None = None,
                           accept: Callable[[T], object] = bool,
                           ignoring: tuple[type[BaseException], ...] = (),
                           every: float = EVERY) -> T: ...


async def eventually_async(check: Callable[[], Any], *, within: float = WITHIN,
                           what: str | None = None,
                           accept: Callable[[Any], object] = bool,
                           ignoring: tuple[type[BaseException], ...] = (),
                           every: float = EVERY) -> Any:
    """``eventually`` on the event loop: ``check`` may be sync or a coroutine function, and
    the loop runs between checks, so the code under test makes progress meanwhile."""
    deadline = time.monotonic() + within
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            last, error = value, None
            if accept(value):
                return value
        except ignoring as exc:
            error = exc
        if time.monotonic() > deadline:
            raise _expired(what, within, last, error)
        await asyncio.sleep(every)

