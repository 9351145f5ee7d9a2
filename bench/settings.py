"""What one bench run does: counts, durations, where it writes. Built once from the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

SCENARIOS = ("ingest", "pipeline", "consumer", "backlog", "memory", "parsing", "forwarding",
             "retry", "aws_drain", "ingest_http")


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """Full run by default; ``quick()`` is one short pass to check that everything runs."""

    runs: int = 3
    duration: float = 8.0  # seconds of each saturation run (wrk)
    rate_duration: float = 8.0  # seconds of each fixed-rate run
    connections: int = 64
    robots: int = 1000  # fleet size the sample mix cycles through
    latency_load: float = 0.5  # fixed-rate latency at this fraction of the measured max
    pipeline_rate: float = 500.0  # callbacks/s for the end-to-end latency target
    consumer_messages: int = 50_000
    backlog_entries: int = 100_000
    memory_entries: int = 1_000_000
    memory_robots: int = 40_000  # distinct robot ids per wave (per-robot state, issue 24)
    database_url: str = "mysql://root:@127.0.0.1:3306/pudu_bench"
    loadgen: str = "wrk"  # or "python" (bench.loadgen.closed_loop)
    scenarios: tuple[str, ...] = SCENARIOS
    profile: bool = False
    keep: bool = False
    results: Path = Path(__file__).resolve().parent / "results"
    quick_mode: bool = False
    long: bool = False  # aws_drain: 36,000 entries instead of 6,000

    @classmethod
    def quick(cls, **overrides: object) -> BenchSettings:
        base = cls(runs=1, duration=3.0, rate_duration=4.0, consumer_messages=10_000,
                   backlog_entries=20_000, memory_entries=1_000_000, memory_robots=10_000,
                   quick_mode=True)
        return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class RunContext:
    """One repetition of one scenario: its own directory for files and logs."""

    settings: BenchSettings
    workdir: Path
    run: int

    def dir(self, name: str) -> Path:
        path = self.workdir / f"run{self.run}" / name
        path.mkdir(parents=True, exist_ok=True)
        return path
