"""``--profile``: py-spy on the product under the same load, after it was measured.

Sampling slows the target, so these passes are extra and their throughput is not
reported. Raw collapsed stacks and a top-functions summary go to ``bench/results``.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from bench.procs import Service
from bench.profile import record, record_native, report, report_native
from bench.samples import BodyFactory
from bench.scenarios.common import saturate
from bench.settings import RunContext

log = logging.getLogger(__name__)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a profiler that stops by itself after its duration; kill it if it hangs."""
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Profiler:
    """One ``py-spy record`` on a process; ``finish()`` waits and writes the summary."""

    def __init__(self, ctx: RunContext, pid: int, name: str, duration: float) -> None:
        ctx.settings.results.mkdir(parents=True, exist_ok=True)
        self.raw = ctx.settings.results / f"profile-{name}.txt"
        self.summary = ctx.settings.results / f"profile-{name}-top.txt"
        self.proc: subprocess.Popen[bytes] = record(pid, self.raw, duration=duration)

    def finish(self) -> Path:
        _reap(self.proc)
        if self.raw.exists():
            text = report(self.raw, top=40)
            self.summary.write_text(text + "\n")
            log.info("%s", text)
        else:
            log.warning("py-spy wrote nothing to %s", self.raw)
        return self.summary


class DatabaseProfiler:
    """``perf record`` on the database server beside a Profiler of the product: what a
    stored envelope costs there (``profile-<name>-top.txt``); nothing without ``perf``."""

    def __init__(self, ctx: RunContext, pid: int, name: str, duration: float,
                 what: str) -> None:
        ctx.settings.results.mkdir(parents=True, exist_ok=True)
        self.data = ctx.workdir / f"perf-{name}.data"
        self.summary = ctx.settings.results / f"profile-{name}-top.txt"
        self.title = f"profile {name}: perf record on the database server, {what}"
        self.proc = record_native(pid, self.data, duration=duration)

    def finish(self) -> Path | None:
        if self.proc is None:
            return None
        _reap(self.proc)
        if not self.data.exists():
            log.warning("perf wrote nothing to %s", self.data)
            return None
        self.summary.write_text(report_native(self.data, self.title) + "\n")
        return self.summary


def profile_edge(ctx: RunContext, edge: Service, name: str = "edge-ingest") -> Path:
    """The edge saturated again (same load as the measured run), sampled by py-spy."""
    prof = Profiler(ctx, edge.pid, name, ctx.settings.duration)
    saturate(ctx, edge, BodyFactory(robots=ctx.settings.robots))
    return prof.finish()


def profile_callback(ctx: RunContext, svc: Service) -> Profiler:
    """The callback server while it drains its queue (from its launch, for ~8 s)."""
    return Profiler(ctx, svc.pid, "callback-drain", 8.0)
