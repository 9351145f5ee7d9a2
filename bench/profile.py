"""py-spy under load: record collapsed stacks and summarise the top functions.

``python -m bench --profile`` records the edge agent during the ingest run and the
callback server during the consumer run (a separate, unmeasured pass: sampling slows
the target). The raw stacks land in ``bench/results/profile-*.txt``; the summary lists
each function's share of samples on top of the stack (self) and anywhere in it (total).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.procs import venv_script

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True, slots=True)
class Hot:
    function: str
    self_pct: float
    total_pct: float


def record(pid: int, out: Path, *, duration: float, rate: int = 200) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on ``pid`` for ``duration`` seconds (raw collapsed stacks)."""
    return subprocess.Popen(
        [venv_script("py-spy"), "record", "--pid", str(pid), "--rate", str(rate),
         "--duration", str(max(1, round(duration))), "--format", "raw", "--output", str(out),
         "--threads", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def record_native(pid: int, out: Path, *, duration: float,
                  rate: int = 499) -> subprocess.Popen[bytes] | None:
    """Start ``perf record`` on a native process (the database server) for ``duration``
    seconds; None where there is no ``perf`` (a Python-only profiler cannot see it)."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    return subprocess.Popen(
        [perf, "record", "-F", str(rate), "-o", str(out), "-p", str(pid), "--",
         "sleep", str(max(1, round(duration)))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def report_native(data: Path, title: str, top: int = 40) -> str:
    """``perf report``'s symbols by self share: a stripped server's unnamed functions
    show as addresses, each listed alone."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "symbol", "--stdio"],
        capture_output=True, text=True, timeout=120, check=False).stdout
    rows = [(float(m.group(1)), m.group(2)) for m in re.finditer(
        r"^\s*([\d.]+)%\s+\[[.k]\]\s+(.*?)(?:\s+-\s+-\s*)?$", out, re.MULTILINE)]
    unnamed = [pct for pct, symbol in rows if symbol.startswith("0x")]
    lines = [title, f"functions without a name (a stripped build): {sum(unnamed):.1f} % "
             f"in {len(unnamed)} addresses", f"{'self %':>7}  symbol"]
    lines += [f"{pct:7.2f}  {symbol}" for pct, symbol in rows[:top]]
    return "\n".join(lines)


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    short = "/".join(path.split("/")[-2:])
    return f"{m.group('func')} ({short})"


def summarise(raw: Path, top: int = 25) -> tuple[list[Hot], dict[str, float]]:
    """Top functions by self samples, and each thread's share of all samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        thread = frames[0].split(":", 1)[-1].strip() if frames[0].startswith("thread") else "?"
        names = [_name(f) for f in frames[1:] if f]
        if not names:
            continue
        samples += count
        threads[thread] += count
        own[names[-1]] += count
        for name in set(names):
            total[name] += count
    if not samples:
        return [], {}
    hot = [Hot(name, 100 * c / samples, 100 * total[name] / samples)
           for name, c in own.most_common(top)]
    return hot, {t: 100 * c / samples for t, c in threads.most_common()}


def report(raw: Path, top: int = 25) -> str:
    hot, threads = summarise(raw, top)
    lines = [f"profile {raw.name}: threads " +
             ", ".join(f"{t} {p:.0f}%" for t, p in threads.items())]
    lines.append(f"{'self %':>7} {'total %':>8}  function")
    lines += [f"{h.self_pct:7.1f} {h.total_pct:8.1f}  {h.function}" for h in hot]
    return "\n".join(lines)
