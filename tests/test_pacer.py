"""The publisher's pacing against AWS IoT Core's per-connection limits, on a simulated
clock: what matters is what *arrives* within any one second, after the way there has
bunched the sends together (issue 27: the bench's shaping proxy counted violations when
a second's worth of sends could leave at once)."""

from __future__ import annotations

import bisect
import random

import pytest

from bridge.frames import FRAME_BYTES
from edge_agent.publisher import Pacer

LIMIT, BYTE_LIMIT = 100, 512 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def paced_sends(sizes: list[int], rng: random.Random, *, stalls: bool) -> list[float]:
    """Send times of ``sizes``, as fast as the pacer allows, each sleep overshooting by up
    to 2 ms and, with ``stalls``, the sender now and then blocked for up to 300 ms."""
    clock = Clock()
    pacer = Pacer(LIMIT, BYTE_LIMIT, clock=clock)
    sent = []
    for size in sizes:
        while pause := pacer.delay(size):
            clock.now += pause + rng.uniform(0, 0.002)
        sent.append(clock.now)
        if stalls and rng.random() < 0.01:
            clock.now += rng.uniform(0.05, 0.3)
    return sent


def worst_second(arrivals: list[float], sizes: list[int]) -> tuple[int, int]:
    """Most publishes and most bytes arriving within any one second."""
    order = sorted(range(len(arrivals)), key=arrivals.__getitem__)
    times = [arrivals[i] for i in order]
    prefix = [0]
    for i in order:
        prefix.append(prefix[-1] + sizes[i])
    most = most_bytes = 0
    for start, t in enumerate(times):
        end = bisect.bisect_left(times, t + 1.0)
        most = max(most, end - start)
        most_bytes = max(most_bytes, prefix[end] - prefix[start])
    return most, most_bytes


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("mix", ["envelopes", "frames"])
def test_sends_bunched_on_the_way_still_arrive_within_the_limits(seed: int, mix: str) -> None:
    rng = random.Random(seed)
    sizes = ([rng.randint(300, 4000) for _ in range(2000)] if mix == "envelopes"
             else [rng.choice([rng.randint(20_000, FRAME_BYTES), FRAME_BYTES]) + 60
                   for _ in range(200)])
    sent = paced_sends(sizes, rng, stalls=True)
    # The way there delays each send, in order (one TCP stream): a delayed send holds
    # back the ones after it, which then arrive bunched. Small sends by up to 30 ms,
    # 125 KiB frames (slower to arrive whole) by up to 250 ms.
    late = 0.03 if mix == "envelopes" else 0.25
    arrivals: list[float] = []
    for t in sent:
        arrivals.append(max(arrivals[-1] if arrivals else 0.0, t + rng.uniform(0, late)))
    most, most_bytes = worst_second(arrivals, sizes)
    assert most <= LIMIT and most_bytes <= BYTE_LIMIT, (most, most_bytes)


def test_the_limit_is_used_not_given_away() -> None:
    """Sleeping a little long each time does not lower the rate: a drain of 2,000 small
    envelopes takes within 5 % of what 100/s allows."""
    rng = random.Random(7)
    sent = paced_sends([500] * 2000, rng, stalls=False)
    assert sent[-1] - sent[0] <= 2000 / LIMIT * 1.05, sent[-1] - sent[0]


def test_zero_limits_pace_nothing() -> None:
    pacer = Pacer(0, 0)
    assert all(pacer.delay(1_000_000) == 0.0 for _ in range(1000))
