"""Full-jitter exponential backoff, shared by every reconnect and retry loop."""

from __future__ import annotations

import random

#: Its own generator: whoever seeds or snapshots the global one (a plugin, hypothesis in
#: the tests) neither lines the fleet's retries up nor sees them move its state.
_jitter = random.Random()


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Uniform in [low, min(high, low * 2**attempt)]: fleets do not retry in lockstep."""
    return _jitter.uniform(low, min(high, low * (2 ** min(attempt, 30))))
