"""Running ``wrk`` (C, epoll) for maximum-throughput runs, with a generated Lua script.

wrk spends a fraction of the CPU per request that a Python client does, which matters
when the generator shares two cores with the app, the broker and the database. Without
wrk the bench falls back to ``bench.loadgen.closed_loop``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.samples import WEBHOOK_PATH, BodyFactory


@dataclass(frozen=True, slots=True)
class WrkResult:
    """wrk's summary: 2xx answers per second and latency percentiles at saturation."""

    requests: int
    ok: int
    elapsed: float
    errors: int
    p50: float  # seconds
    p99: float

    @property
    def ok_per_second(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(port: int, factory: BodyFactory, script_dir: Path, *, duration: float,
            connections: int = 64, threads: int = 1, path: str = WEBHOOK_PATH) -> WrkResult:
    """``wrk -t{threads} -c{connections}`` against ``127.0.0.1:{port}{path}``."""
    binary = wrk_path()
    if binary is None:
        raise FileNotFoundError("wrk is not installed (apt-get install -y wrk)")
    script = script_dir / f"wrk-{factory.tag}.lua"
    script.write_text(factory.lua_script(path=path, threads=threads))
    proc = subprocess.run(
        [binary, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
         "-s", str(script), f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=duration + 60, check=False,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-800:]}"
                           f"{proc.stderr[-800:]}")
    data = json.loads(line.removeprefix("BENCHJSON "))
    errors = sum(data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return WrkResult(
        requests=data["requests"],
        ok=data["requests"] - data["status_errors"],
        elapsed=data["duration_us"] / 1e6,
        errors=errors,
        p50=data["p50_us"] / 1e6,
        p99=data["p99_us"] / 1e6,
    )
