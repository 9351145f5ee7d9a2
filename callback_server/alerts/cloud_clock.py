"""The cloud's own measure of each gateway's clock, for the ``gateway_clock`` rule.

A gateway judges its clock by its robots' (``gateway_clock_offset_s``), which it cannot do
with one robot: it then says 0. This server's clock is NTP-synced in a data centre, so a
heartbeat's ``timestamp`` against the time it was received here measures the gateway's
clock too, but through the network: a heartbeat can arrive late, never early, so delay
only ever makes a clock look *behind*. Hence:

- only live heartbeats count: not one sent while the gateway drains a backlog (its
  heartbeat queues behind it: ``draining``), not one already counted (the same
  ``timestamp``: an MQTT or HTTP-ingest redelivery);
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


class CloudClock:
    """Per gateway, the offsets (+ ahead) of its last ``heartbeats`` live heartbeats."""

    def __init__(self, heartbeats: int) -> None:
        self.heartbeats = heartbeats
        self._recent: dict[GatewayKey, collections.deque[tuple[float, float]]] = {}

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
        recent = self._recent.get(gateway)
        if recent is None:
            if len(self._recent) >= MAX_GATEWAYS:
                self._recent.pop(next(iter(self._recent)))
            recent = self._recent[gateway] = collections.deque(maxlen=self.heartbeats)
        live = beat.get("draining") is not True and all(t != sent for t, _ in recent)
        if live:
            recent.append((float(sent), float(sent) - received))
        if len(recent) < self.heartbeats:
            return True, None
        return True, round(max(offset for _, offset in recent), 1)
