"""The garbage collector set for a long-running service under load.

CPython's defaults (a young collection every 700 net container allocations) suit short
scripts. A service allocating a few dozen containers per message collects its young
generation thousands of times a minute, promotes the objects of requests still in
flight, and so runs full collections that walk everything startup built (modules, the
app, settings: ~110,000 objects): measured on the callback server's HTTP ingest, 10.6 %
of its CPU went to the collector, 62 % of that in full collections of ~49 ms each
(docs/benchmarks.md). Once the service serves, what startup built is frozen (full
collections skip it; it lives as long as the process anyway) and young collections run
every ``YOUNG_THRESHOLD`` allocations instead. Reference counting still frees nearly
everything at once; only cyclic garbage waits longer, a bounded amount.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

#: Net container allocations between young collections (CPython's default is 700).
YOUNG_THRESHOLD = 10_000


def settle_after_startup() -> None:
    """Collect what startup left, freeze the survivors, and collect the young less often.
    Called once, when every listener serves."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    log.debug("garbage collector: %d startup objects frozen; young threshold %d",
              gc.get_freeze_count(), YOUNG_THRESHOLD)
