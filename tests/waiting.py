"""Waiting for a condition in async tests: polled against a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(check: Callable[[], bool], within: float = 15) -> None:
    """Return once ``check()`` holds (a counter or state the code keeps); TimeoutError
    past ``within`` seconds. Polls the event loop, so the code under test runs meanwhile."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)
