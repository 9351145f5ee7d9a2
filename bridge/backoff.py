"""Full-jitter exponential backoff, shared by every reconnect and retry loop."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Uniform in [low, min(high, low * 2**attempt)]: fleets do not retry in lockstep."""
    return random.uniform(low, min(high, low * (2 ** min(attempt, 30))))
