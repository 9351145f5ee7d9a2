"""Machine notes for the results: CPU, cores, memory, versions of what was measured."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.procs import MOSQUITTO
from bench.wrk import wrk_path

PACKAGES = ("uvicorn", "uvloop", "httptools", "fastapi", "starlette", "pydantic",
            "paho-mqtt", "aiomysql", "PyMySQL", "flask", "gunicorn")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def python_loop_ms() -> float:
    """The best of three timings of one fixed pure-Python loop: how fast this host runs
    Python right now. A shared host's speed moves from day to day (the naive ingest's
    CPU per request: 637 µs one day, 1,365-1,542 the next); absolute figures of two runs
    compare only as far as this does, ratios within a run regardless."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 1)


def notes(mariadb_version: str) -> dict[str, Any]:
    pkgs: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            pkgs[name] = None
    wrk = wrk_path()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": _first_line([MOSQUITTO, "-h"]).removeprefix("mosquitto version "),
        "mariadb": mariadb_version,
        "wrk": _first_line([wrk, "-v"]).split(" [")[0].replace("debian/", "") if wrk else None,
        "packages": pkgs,
        "load_average_at_start": os.getloadavg(),
        "python_loop_ms_at_start": python_loop_ms(),
    }
