"""What the edge keeps in memory per robot is forgotten once the robot has been quiet.

Several parts keep a little state per robot: the newest state for ``get_robots``, the
downsampler's last published robot time per channel, the poller's last published state
and shop. Kept for every robot that ever reported, that grows without bound on a gateway
that sees many robot ids over its life (measured ~0.6 KiB per id, never released).

``RobotMemory`` records when each robot was last heard of (a webhook, a poll) in a dict
kept in that order, so a sweep pops quiet robots from its front without scanning the rest;
it then tells every holder to forget them. The quiet time (``ROBOT_QUIET_SECONDS``,
a day by default) is far longer than anything that state decides about: a downsampling
interval, a late retry of a callback, an hourly poll (the poller marks every robot of its
inventory as heard on each run, so a robot still listed is never forgotten and nothing it
would publish changes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["RobotMemory"]


@dataclass(frozen=True, slots=True)
class _Holder:
    name: str
    forget: Callable[[str], object]
    size: Callable[[], int]


class RobotMemory:
    """Last-heard times per robot; ``sweep`` forgets quiet robots in every holder."""

    def __init__(self, quiet_seconds: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet_seconds = quiet_seconds
        self.clock = clock
        self.forgotten = 0
        self._heard: dict[str, float] = {}  # oldest first: re-inserted on every hear
        self._holders: list[_Holder] = []

    def hold(self, name: str, forget: Callable[[str], object], size: Callable[[], int]) -> None:
        """Register state kept per robot: ``forget(sn)`` drops it, ``size()`` counts it."""
        self._holders.append(_Holder(name, forget, size))

    def heard(self, sn: str) -> None:
        """The robot reported (or was polled) now."""
        self._heard.pop(sn, None)
        self._heard[sn] = self.clock()

    def sweep(self) -> int:
        """Forget every robot not heard of for ``quiet_seconds``; how many."""
        before = self.clock() - self.quiet_seconds
        quiet: list[str] = []
        for sn, at in self._heard.items():
            if at > before:
                break
            quiet.append(sn)
        for sn in quiet:
            del self._heard[sn]
            for holder in self._holders:
                holder.forget(sn)
        self.forgotten += len(quiet)
        if quiet:
            log.info("forgot %d robots quiet for %g s", len(quiet), self.quiet_seconds)
        return len(quiet)

    def states(self) -> dict[str, int]:
        """Entries kept per robot, by holder (``heard``: this object's own)."""
        return {"heard": len(self._heard), **{h.name: h.size() for h in self._holders}}

    async def run(self) -> None:
        """Until cancelled: sweep a few times per quiet time (at least every minute)."""
        every = min(60.0, max(0.05, self.quiet_seconds / 4))
        while True:
            await asyncio.sleep(every)
            self.sweep()
