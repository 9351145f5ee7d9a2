"""``python -m bench``: every scenario, several runs, a table, ``bench/results/latest.json``.

``--quick`` is one short pass with smaller counts, to check that everything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import db
from bench.machine import notes, python_loop_ms
from bench.procs import MOSQUITTO
from bench.report import table, to_json, write
from bench.settings import SCENARIOS, BenchSettings, RunContext
from bench.stats import FIGURES, TARGETS, met, summarise
from bench.wrk import wrk_path

log = logging.getLogger("bench")
TARGET_BY_KEY = {t.key: t for t in TARGETS}


def parse_args(argv: list[str] | None = None) -> BenchSettings:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 run, short durations, small counts")
    p.add_argument("--runs", type=int, help="repetitions (default 3; --quick: 1)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--duration", type=float, help="seconds per saturation run")
    p.add_argument("--loadgen", choices=["wrk", "python"], help="default: wrk if installed")
    p.add_argument("--database-url", help="default mysql://root:@127.0.0.1:3306/pudu_bench")
    p.add_argument("--profile", action="store_true",
                   help="extra py-spy passes (edge ingest, callback drain) in run 1")
    p.add_argument("--long", action="store_true",
                   help="aws_drain: a 36,000-entry backlog instead of 6,000")
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    p.add_argument("--results", type=Path, help="directory for latest.json and profiles")
    a = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    if a.runs:
        overrides["runs"] = a.runs
    if a.only:
        chosen = tuple(x.strip() for x in a.only.split(",") if x.strip())
        unknown = set(chosen) - set(SCENARIOS)
        if unknown:
            p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        overrides["scenarios"] = chosen
    if a.duration:
        overrides["duration"] = a.duration
    if a.long:
        overrides["long"] = True
    overrides["loadgen"] = a.loadgen or ("wrk" if wrk_path() else "python")
    if a.database_url:
        overrides["database_url"] = a.database_url
    if a.results:
        overrides["results"] = a.results
    overrides["profile"] = a.profile
    overrides["keep"] = a.keep
    if a.quick:
        return BenchSettings.quick(**overrides)
    return dataclasses.replace(BenchSettings(), **overrides)


def preflight(s: BenchSettings) -> str:
    """Fail early, with the fix, when something the bench needs is missing."""
    if not Path(MOSQUITTO).exists() and not shutil.which("mosquitto"):
        sys.exit("bench: mosquitto is not installed (apt-get install -y mosquitto)")
    try:
        version = db.ensure_database(s.database_url)
    except Exception as exc:
        sys.exit(f"bench: MariaDB at {s.database_url} is not usable: {exc}")
    if "pipeline" in s.scenarios:
        for module in ("flask", "gunicorn"):
            try:
                importlib.import_module(module)
            except ImportError:
                sys.exit("bench: the naive_webhook baseline needs Flask and gunicorn: "
                         ".venv/bin/pip install flask gunicorn")
    if s.loadgen == "python":
        log.warning("wrk not found: saturation runs use the Python generator, which takes "
                    "more CPU from the servers (apt-get install -y wrk)")
    return version


def product_version() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it (bench/ aside)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent.parent,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    changed = [line for line in git("status", "--porcelain").splitlines()
               if not line[3:].startswith("bench/")]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "modified_files": changed}


def carry_over(path: Path, data: dict[str, Any], ran: tuple[str, ...]) -> dict[str, Any]:
    """``data`` plus the figures of the scenarios this run left out, from the previous
    ``latest.json``: ``--only`` refreshes what it ran and drops nothing else. Targets
    whose figure was carried are judged from it; ``carried_over`` says from which run."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return data
    kept = {key: fig for key, fig in previous.get("figures", {}).items()
            if key.split(".")[0] not in ran and key not in data["figures"]}
    if not kept:
        return data
    figures = {**data["figures"], **kept}
    data["figures"] = {f.key: figures[f.key] for f in FIGURES if f.key in figures}
    for target in data["targets"]:
        fig = kept.get(target["figure"])
        if fig is not None and fig.get("median") is not None:
            summary = summarise([float(v) for v in fig["values"] if v is not None])
            target.update(median=summary.median, min=summary.low, max=summary.high,
                          met=met(TARGET_BY_KEY[target["figure"]], summary))
    data["carried_over"] = {
        "scenarios": sorted({key.split(".")[0] for key in kept}),
        "from_generated_at": previous.get("generated_at"),
        "from_commit": (previous.get("product") or {}).get("commit"),
        "earlier": previous.get("carried_over"),
    }
    return data


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    # httpx logs every request at INFO: 3,000 lines a run of the retry scenario, and the
    # time the client spends on them delays its reading of the answers.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    s = parse_args(argv)
    mariadb = preflight(s)
    machine = notes(mariadb)
    workdir = Path(tempfile.mkdtemp(prefix="pudu-bench-"))
    log.info("bench: %d run(s) of %s; work directory %s", s.runs, ", ".join(s.scenarios),
             workdir)
    db.reset(s.database_url, drop=True)  # fresh tables in the current schema
    runners: dict[str, Callable[[RunContext], dict[str, float]]] = {
        name: importlib.import_module(f"bench.scenarios.{name}").run for name in s.scenarios
    }
    values: dict[str, list[float]] = {}
    errors: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    started = time.time()
    for run in range(s.runs):
        for name, scenario in runners.items():
            load, speed = os.getloadavg()[0], python_loop_ms()
            loads.append({"run": run + 1, "scenario": name, "loadavg_1m": load,
                          "python_loop_ms": speed})
            log.info("run %d/%d: %s (load average %.2f, the Python loop %.0f ms)",
                     run + 1, s.runs, name, load, speed)
            t0 = time.monotonic()
            try:
                result = scenario(RunContext(s, workdir, run))
            except Exception as exc:
                log.error("%s failed in run %d: %s", name, run + 1, exc)
                errors.append({"scenario": name, "run": run + 1, "error": str(exc),
                               "traceback": traceback.format_exc()[-3000:]})
                continue
            log.info("%s took %.0f s", name, time.monotonic() - t0)
            for key, value in result.items():
                values.setdefault(key, []).append(float(value))
    elapsed = time.time() - started
    summaries = {key: summarise(v) for key, v in values.items()}
    mode = "quick" if s.quick_mode else "full"
    header = (
        f"Pudu fleet bridge bench ({mode}, {s.runs} run(s), median/min/max; "
        f"{elapsed / 60:.1f} min)\n"
        f"{machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']} "
        f"(its loop {machine['python_loop_ms_at_start']:.0f} ms), "
        f"mosquitto {machine['mosquitto']}, MariaDB {machine['mariadb']}; "
        f"load: {s.loadgen if s.loadgen == 'python' else machine['wrk']}, "
        f"{s.connections} connections"
    )
    print(table(summaries, header))
    settings = {k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(s).items()}
    data = to_json(summaries, meta={
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": mode, "runs": s.runs, "duration_seconds": round(elapsed, 1),
        "product": product_version(), "machine": machine, "settings": settings,
        "errors": errors,
        "load_before_each_scenario": loads,
    })
    out = s.results / "latest.json"
    data = carry_over(out, data, s.scenarios)
    write(out, data)
    print(f"\nwrote {out}")
    if errors:
        print(f"{len(errors)} scenario run(s) failed; logs kept in {workdir}", file=sys.stderr)
        for e in errors:
            print(f"  {e['scenario']} (run {e['run']}): {e['error']}", file=sys.stderr)
        return 1
    if s.keep:
        print(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
