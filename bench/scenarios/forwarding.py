"""Target 7 (issue 17): messages published per 1,000 callbacks of the sample mix, with
docs/edge-agent.md's suggested ``MIN_INTERVAL_SECONDS`` against the same load with none.

AWS IoT Core bills each published message (per 5 KB; every envelope is smaller), so
this ratio is the bill's. The load is a small site, not a saturation run: ``ROBOTS``
robots sending the bench's mix (bench/samples.py: 4 in 19 are poses, 4 power, 4 status,
2 move) at ``RATE`` callbacks/s in all, 1,000 of them: each robot 5 callbacks/s, so a
pose and a power about every second (the issue's premise), for 50 s. The count is the
edge's own ``edge_published_total`` once the outbox is drained and nothing is held (the
last power waits up to its 30 s interval). With nothing filtered the output is the input
whatever the pace, so that control run goes at 10x the rate.
"""

from __future__ import annotations

import logging

from bench import apps
from bench.loadgen import open_loop
from bench.procs import Broker
from bench.samples import BodyFactory
from bench.scenarios.common import edge_health, labelled, metric, run_async, wait_until
from bench.settings import RunContext

log = logging.getLogger(__name__)

CALLBACKS = 1000
ROBOTS = 4
RATE = 20.0  # callbacks/s for the site: 5 per robot
#: The suggestion of docs/edge-agent.md, "What leaves the site".
SUGGESTED = "pose=5,power=30,move=5"


def _published(ctx: RunContext, broker: Broker, name: str, rate: float, **env: str
               ) -> tuple[float, float]:
    """(published, downsampled) for CALLBACKS callbacks through a fresh edge agent."""
    d = ctx.dir(f"forwarding-{name}")
    with apps.edge_agent(d, "edge", broker.url, d / "outbox.db", **env) as edge:
        factory = BodyFactory(robots=ROBOTS, tag=f"f{name[0]}{ctx.run}")
        result = run_async(open_loop("127.0.0.1", edge.port, factory, rate=rate,
                                     duration=CALLBACKS / rate, connections=8))
        if result.ok != CALLBACKS:
            raise RuntimeError(f"{result.ok} of {CALLBACKS} callbacks answered 2xx")

        def settled() -> bool:
            h = edge_health(edge)
            return h["outbox_held"] == 0 and h["outbox_depth"] == 0 and h["inflight"] == 0

        wait_until(settled, timeout=90, interval=0.2, what="held and outbox drained")
        published = metric(edge, "edge_published_total")
        downsampled = sum(labelled(edge, "edge_downsampled_total", f'channel="{c}"')
                          for c in ("pose", "power", "move"))
    log.info("forwarding %s: %d callbacks -> %d published, %d downsampled", name,
             CALLBACKS, published, downsampled)
    return published, downsampled


def run(ctx: RunContext) -> dict[str, float]:
    with Broker(ctx.dir("forwarding") / "broker") as broker:
        everything, _ = _published(ctx, broker, "all", RATE * 10)
        suggested, downsampled = _published(ctx, broker, "suggested", RATE,
                                            MIN_INTERVAL_SECONDS=SUGGESTED)
    scale = 1000 / CALLBACKS
    return {
        "forwarding.all_per_1000": everything * scale,
        "forwarding.suggested_per_1000": suggested * scale,
        "forwarding.downsampled_per_1000": downsampled * scale,
        "forwarding.suggested_vs_all": suggested / everything if everything else 0.0,
    }
