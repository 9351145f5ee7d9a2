"""How much of a process's CPU its garbage collector takes, for any process the bench runs.

Put this directory first on ``PYTHONPATH`` (``PYTHONPATH=bench/gc_probe:. python -m bench
--only ingest_http``): every Python process started with it writes ``gc-<pid>.txt`` into
``$GC_PROBE_DIR`` (the temporary directory by default) every 2 s: its command line, the
CPU seconds its collections took (timed on the collecting thread's CPU clock), per
generation their count and seconds, the process's CPU seconds, and the objects tracked
and frozen. docs/benchmarks.md measured the collector's share with it
(bridge/service/heap.py is the outcome).
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_OUT = Path(os.environ.get("GC_PROBE_DIR") or tempfile.gettempdir())
_counts = [0, 0, 0]
_seconds = [0.0, 0.0, 0.0]
_started = [0.0]


def _timed(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.thread_time()
    else:
        _counts[info["generation"]] += 1
        _seconds[info["generation"]] += time.thread_time() - _started[0]


def _report() -> None:
    while True:
        time.sleep(2)
        line = (f"{' '.join(sys.argv)[:200]}\n"
                f"gc {sum(_seconds):.3f} s of cpu {time.process_time():.3f} s; "
                f"collections {_counts} taking {[round(s, 3) for s in _seconds]} s; "
                f"tracked {len(gc.get_objects())}, frozen {gc.get_freeze_count()}, "
                f"thresholds {gc.get_threshold()}\n")
        (_OUT / f"gc-{os.getpid()}.txt").write_text(line)


gc.callbacks.append(_timed)
threading.Thread(target=_report, name="gc-probe", daemon=True).start()
