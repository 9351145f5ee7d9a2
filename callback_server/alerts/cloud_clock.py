"""The cloud's own measure of each gateway's clock, for the ``gateway_clock`` rule.

A gateway judges its clock by its robots' (``gateway_clock_offset_s``), which it cannot do
with one robot: it then says 0. This server's clock is NTP-synced in a data centre, so a
heartbeat's ``timestamp`` against the time it was received here measures the gateway's
clock too, but through the network: a heartbeat can arrive late, never early, so delay
only ever makes a clock look *behind*. Hence:

- only live heartbeats count: not one sent while the gateway drains a backlog (its
  heartbeat queues behind it: ``draining``), not one already counted (the same
  ``timestamp``: an MQTT or HTTP-ingest redelivery), and not one that came out of pace
  with the one before it (received sooner or later after it than it was sent: a burst
  the broker held for this server while it was away, or one held up on the way);
- the measure is the *largest* offset of the last ``heartbeats`` live ones (the least
  late is the truest), and there is none until that many were heard: a gateway is found
  behind only when every one of them is, and a late heartbeat never hides one ahead.
"""

from __future__ import annotations

import collections
import math
from typing import Any

#: Gateways whose recent heartbeats are kept; past this the longest kept is forgotten.
MAX_GATEWAYS = 50_000

GatewayKey = tuple[str, str]

#: How far a heartbeat's gap to the one before may differ between sending and receiving
#: (seconds, or this share of the gap if more) and it still count as live.
PACE_SECONDS = 2.0
PACE_SHARE = 0.25


class _Heard:
    """One gateway's heartbeats: the last heard, live or not, and the live ones kept."""

    __slots__ = ("last", "live")

    def __init__(self, heartbeats: int) -> None:
        self.last: tuple[float, float] | None = None  # (sent, received)
        self.live: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=heartbeats)  # (sent, offset)


class CloudClock:
    """Per gateway, the offsets (+ ahead) of its last ``heartbeats`` live heartbeats."""

    def __init__(self, heartbeats: int) -> None:
        self.heartbeats = heartbeats
        self._heard: dict[GatewayKey, _Heard] = {}

    def measure(self, gateway: GatewayKey, beat: dict[str, Any],
                received: float) -> tuple[bool, float | None]:
        """Take heartbeat ``beat`` of ``gateway``, received at ``received`` (this server's
        clock): (whether the measure applies, the offset in seconds or None while not yet
        decided). It does not apply when ``heartbeats`` is 0 or the heartbeat has no
        ``timestamp`` (an agent that sends none)."""
        sent = beat.get("timestamp")
        if self.heartbeats <= 0 or isinstance(sent, bool) or not isinstance(
                sent, int | float) or not math.isfinite(sent):
            return False, None
        heard = self._heard.get(gateway)
        if heard is None:
            if len(self._heard) >= MAX_GATEWAYS:
                self._heard.pop(next(iter(self._heard)))
            heard = self._heard[gateway] = _Heard(self.heartbeats)
        last, heard.last = heard.last, (float(sent), received)
        if beat.get("draining") is not True and all(t != sent for t, _ in heard.live) \
                and last is not None and _paced(float(sent) - last[0], received - last[1]):
            heard.live.append((float(sent), float(sent) - received))
        if len(heard.live) < self.heartbeats:
            return True, None
        return True, round(max(offset for _, offset in heard.live), 1)


def _paced(sent_gap: float, received_gap: float) -> bool:
    """Did a heartbeat come as long after the one before as it was sent after it?"""
    return sent_gap > 0 and abs(received_gap - sent_gap) <= max(PACE_SECONDS,
                                                                PACE_SHARE * sent_gap)
