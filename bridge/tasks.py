"""Background task bookkeeping shared by both services."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for each to finish, so none outlives its owner."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def within(aw: Awaitable[object], seconds: float) -> bool:
    """Await ``aw`` for at most ``seconds``: True if it finished, False (it is cancelled)
    if the time ran out. Loops that the watchdog checks wait this way, so they come round
    to stamp their heartbeat even while there is nothing to do."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
    # that arrives as its timeout fires, and a loop waiting this way would then never stop.
    try:
        async with asyncio.timeout(seconds):
            await aw
    except TimeoutError:
        return False
    return True
