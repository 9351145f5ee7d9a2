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
from typing import TypeVar

T = TypeVar("T")

EVERY = 0.02  # seconds between checks: short, so a test waits no longer than it must


class NotYet(AssertionError):
    """The awaited condition did not hold by the deadline; the message says what it was."""


def _expired(what: str | None, within: float, last: object, error: BaseException | None) -> NotYet:
    said = what or "condition"
    tail = f"; last error: {error!r}" if error is not None else f"; last value: {last!r}"
    return NotYet(f"{said} not met within {within:g} s{tail}")


def eventually(check: Callable[[], T], *, within: float = 15, what: str | None = None,
               ignoring: tuple[type[BaseException], ...] = (), every: float = EVERY) -> T:
    """Return ``check()``'s first truthy result; ``NotYet`` naming ``what`` past ``within`` s.

    An exception in ``ignoring`` (a service still starting: ``OSError``) counts as "not yet".
    """
    deadline = time.monotonic() + within
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            last, error = check(), None
            if last:
                return last
        except ignoring as exc:
            error = exc
        if time.monotonic() > deadline:
            raise _expired(what, within, last, error)
        time.sleep(every)


async def eventually_async(check: Callable[[], T | Awaitable[T]], *, within: float = 15,
                           what: str | None = None,
                           ignoring: tuple[type[BaseException], ...] = (),
                           every: float = EVERY) -> T:
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
            if value:
                return value
        except ignoring as exc:
            error = exc
        if time.monotonic() > deadline:
            raise _expired(what, within, last, error)
        await asyncio.sleep(every)

