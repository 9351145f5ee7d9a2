"""The garbage collector as a service leaves it once it serves (bridge.service.heap)."""

from __future__ import annotations

import json
import subprocess
import sys

from bridge.service.heap import YOUNG_THRESHOLD

_PROBE = """
import gc, json
import callback_server.service  # what a service has built by the time it serves
before = gc.get_threshold()
from bridge.service.heap import settle_after_startup
settle_after_startup()
print(json.dumps({"before": before, "after": gc.get_threshold(),
                  "frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""


def test_startup_is_frozen_and_the_young_collected_less_often() -> None:
    # a process of its own: freezing this one would keep the test session's garbage
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True, timeout=60)
    probe = json.loads(out.stdout)
    assert probe["before"][0] == 700  # CPython's default, which the service replaces
    assert probe["after"] == [YOUNG_THRESHOLD, *probe["before"][1:]]
    # full collections walk only what was made after startup: nearly nothing here
    assert probe["frozen"] > 50_000 > probe["tracked"]
