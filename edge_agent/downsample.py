"""Per-robot downsampling of superseded state (MIN_INTERVAL_SECONDS): at most one message
per robot and channel per interval, and the one published is the newest.

The first message of a quiet robot is published at once and opens an interval; what
arrives during the interval is *held* (the newest by robot time wins) and published
when the interval ends, which opens the next. So the last state of a robot always
leaves, and nothing waits longer than one interval. A message older (by robot time) than
the one last published for its robot and channel is superseded, not published after it.

``Throttle`` is the timing alone, on a clock the caller passes (tests drive it).
``Downsampler`` applies it: held messages are written to the outbox's ``held`` table
*before* their 200 (bridge/outbox.py), so a crash during an interval loses nothing; its
loop releases each key when its interval ends.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import time
from collections.abc import Callable, Mapping

from bridge.outbox import Outbox
from bridge.service.sdnotify import BEAT_SECONDS
from bridge.service.taskset import within

__all__ = ["LATE_WINDOW_SECONDS", "Downsampler", "Throttle", "Verdict"]

#: How much older than the last published message a late one may be and still count as
#: superseded. Older still is taken as the robot's clock having gone back (a reset or a
#: correction): remembering across that would silence the robot until its clock caught up.
LATE_WINDOW_SECONDS = 60.0


class Verdict(enum.Enum):
    """What to do with one message of a downsampled channel."""

    PUBLISH = "publish"  # now: put it in the outbox
    HOLD = "hold"  # put it in the held table (``Outbox.put(hold=True)``)
    SUPERSEDED = "superseded"  # older than what was published: store nothing, count it


class Throttle:
    """Which key may publish now, which must be held, and when each hold ends."""

    def __init__(self, intervals: Mapping[str, float]) -> None:
        self.intervals = dict(intervals)
        self._free_at: dict[str, float] = {}  # key -> when it may publish at once again
        self._armed: set[str] = set()  # keys with a hold ending at their _free_at
        self._ends: list[tuple[float, str, float]] = []  # heap of (end, key, interval)

    def offer(self, key: str, channel: str, now: float) -> bool:
        """A message for ``key`` arrived: False to publish it now, True to hold it."""
        if key in self._armed:
            return True
        interval = self.intervals[channel]
        free = self._free_at.get(key)
        if free is None or now >= free:
            self._free_at[key] = now + interval
            return False
        self._armed.add(key)
        heapq.heappush(self._ends, (free, key, interval))
        return True

    def next_end(self) -> float | None:
        """When the earliest hold ends (None: nothing held)."""
        return self._ends[0][0] if self._ends else None

    def ended(self, now: float) -> list[str]:
        """Keys whose hold ended by ``now``: release them; each opens a new interval."""
        out: list[str] = []
        while self._ends and self._ends[0][0] <= now:
            _, key, interval = heapq.heappop(self._ends)
            self._armed.discard(key)
            self._free_at[key] = now + interval
            out.append(key)
        return out

    def prune(self, now: float) -> None:
        """Forget keys whose interval is over and nothing held (they act as unseen)."""
        for key in [k for k, free in self._free_at.items() if free <= now]:
            if key not in self._armed:
                del self._free_at[key]

    def forget(self, key: str) -> None:
        """Drop ``key``'s interval unless a hold of it is pending (RobotMemory)."""
        if key not in self._armed:
            self._free_at.pop(key, None)

    def __len__(self) -> int:
        return len(self._free_at)


class Downsampler:
    """The Throttle on the monotonic clock, releasing held outbox rows as intervals end."""

    def __init__(self, outbox: Outbox, intervals: Mapping[str, float], *,
                 clock: Callable[[], float] = time.monotonic,
                 beat: Callable[[], None] = lambda: None) -> None:
        self.outbox = outbox
        self.throttle = Throttle(intervals)
        self.clock = clock
        self.beat = beat  # the watchdog's: a wedged loop would hold state forever
        self.released = 0
        self._woken = asyncio.Event()
        # Robot time of the message last published (or due to be, when held) per key,
        # so a late, older one is not published after it. In memory: after a restart
        # the first message per key is taken as it comes.
        self._published: dict[str, float] = {}
        self._held: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.throttle.intervals)

    def applies(self, channel: str) -> bool:
        return channel in self.throttle.intervals

    def offer(self, key: str, channel: str, order: float) -> Verdict:
        """Publish, hold or drop the message of robot time ``order`` for ``key``.

        Call it right before the put, with no await between: the order of decisions is
        then the order in which the writer sees puts and releases."""
        last = self._published.get(key)
        if last is not None and last - LATE_WINDOW_SECONDS <= order < last:
            return Verdict.SUPERSEDED
        if not self.throttle.offer(key, channel, self.clock()):
            self._published[key] = order
            return Verdict.PUBLISH
        if order >= self._held.get(key, order):  # the outbox keeps the newest held too
            self._held[key] = order
        self._woken.set()  # the loop may be sleeping past this new end
        return Verdict.HOLD

    def forget(self, device: str) -> None:
        """A robot quiet for long (edge_agent.robot_memory): drop what is kept for it."""
        for channel in self.throttle.intervals:
            key = f"{channel}:{device}"
            if key not in self._held:
                self._published.pop(key, None)
                self.throttle.forget(key)

    def __len__(self) -> int:
        """Keys with state kept (published times, intervals, holds)."""
        return len(self._published) + len(self.throttle) + len(self._held)

    def release_ended(self) -> int:
        """Release every key whose interval has ended; how many."""
        keys = self.throttle.ended(self.clock())
        self.outbox.release(keys)
        for key in keys:
            if key in self._held:
                self._published[key] = self._held.pop(key)
        self.released += len(keys)
        return len(keys)

    async def run(self) -> None:
        """Until cancelled: sleep to the next end (or a new hold), release, repeat."""
        pruned = self.clock()
        while True:
            self.beat()
            now = self.clock()
            self.release_ended()
            if now - pruned > 60:
                self.throttle.prune(now)
                pruned = now
            end = self.throttle.next_end()
            wait = BEAT_SECONDS if end is None else min(BEAT_SECONDS, max(0.0, end - now))
            self._woken.clear()
            if wait > 0:
                await within(self._woken.wait(), wait)
