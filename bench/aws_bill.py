"""The AWS IoT Core bill of 1,000 callbacks of the realistic mix (issue 27): messages
and billed 5 KiB units, with and without ``MIN_INTERVAL_SECONDS`` downsampling and batch
frames. ``python -m bench.aws_bill``.

The envelopes are the edge's own (bench/samples.py: the sample mix normalised and
enveloped as the agent does); downsampling is the agent's own ``Throttle`` on a
simulated clock at the forwarding scenario's pace (4 robots, 20 callbacks/s in all);
frames are ``bridge.frames.pack`` as the publisher builds them during a drain. Pure
computation: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable

from bench.samples import envelopes
from bridge import frames
from edge_agent.downsample import Throttle

CALLBACKS = 1000
ROBOTS = 4
RATE = 20.0
SUGGESTED = {"pose": 5.0, "power": 30.0, "move": 5.0}


def downsampled(items: list[tuple[str, bytes, str | None]]) -> list[bytes]:
    """What the agent publishes with docs/edge-agent.md's suggested intervals, in order."""
    throttle = Throttle(SUGGESTED)
    held: dict[str, bytes] = {}
    out: list[bytes] = []
    for n, (topic, payload, _) in enumerate(items):
        now = n / RATE
        for key in throttle.ended(now):
            out.append(held.pop(key))
        channel = topic.rsplit("/", 1)[-1]
        if channel not in SUGGESTED:
            out.append(payload)
            continue
        key = f"{channel}:{topic}"
        if throttle.offer(key, channel, now):
            held[key] = payload  # the newest held wins
        else:
            out.append(payload)
    out += held.values()  # released when their intervals end
    return out


def bill(payloads: Iterable[bytes], framed: bool) -> tuple[int, int]:
    """(messages, billed 5 KiB units)."""
    sent = [f for _, f in frames.pack(payloads)] if framed else list(payloads)
    return len(sent), sum(frames.billed_units(len(p)) for p in sent)


def figures(callbacks: int = CALLBACKS) -> dict[str, float]:
    items = list(envelopes(callbacks, org="acme", gateway="site-1", robots=ROBOTS,
                           tag="bill"))
    every = [p for _, p, _ in items]
    fewer = downsampled(items)
    scale = 1000 / callbacks
    out: dict[str, float] = {"mean_envelope_bytes": sum(map(len, every)) / len(every)}
    for name, payloads in (("all", every), ("downsampled", fewer)):
        for mode, framed in (("single", False), ("frames", True)):
            messages, units = bill(payloads, framed)
            out[f"{name}.{mode}.messages_per_1000"] = messages * scale
            out[f"{name}.{mode}.units_per_1000"] = units * scale
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callbacks", type=int, default=CALLBACKS)
    print(json.dumps(figures(p.parse_args().callbacks), indent=1))


if __name__ == "__main__":
    main()
