"""The printed table and ``bench/results/latest.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.stats import FIGURES, TARGETS, Summary, met

GROUPS = {
    "ingest": "1. edge ingest (1 worker, 64 connections, sample mix)",
    "pipeline": "2. whole pipeline (webhook -> edge -> Mosquitto -> callback server -> MariaDB)",
    "consumer": "3. callback server alone (queued at the broker -> MariaDB)",
    "backlog": "4. backlog drain (outbox built while the broker was down)",
    "memory": "5. edge agent memory",
    "parsing": "6. bounded strict parsing (in process, sample mix)",
    "forwarding": "7. what leaves the site (1,000 callbacks of the mix, 4 robots at 5/s each)",
    "retry": "8. callback server, database away: the same 300 messages retried 3,000 times",
    "ingest_http": "10. the cloud's HTTP ingest path (POST /callback/messages -> MariaDB)",
    "aws_drain": "9. an outage's backlog drained to AWS IoT Core's limits (awsiot, shaping proxy)",
}


def fmt(value: float, unit: str = "") -> str:
    if math.isnan(value):
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "count":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(summaries: Mapping[str, Summary], header: str) -> str:
    lines = [header, ""]
    width = max(len(f.label) for f in FIGURES) + 2
    lines.append(f"  {'figure':<{width}}{'median':>10}{'min':>10}{'max':>10}  unit")
    group = ""
    for fig in FIGURES:
        if fig.key not in summaries:
            continue
        scenario = fig.key.split(".")[0]
        if scenario != group:
            group = scenario
            lines.append(f"  -- {GROUPS[scenario]}")
        s = summaries[fig.key]
        lines.append(f"  {fig.label:<{width}}{fmt(s.median, fig.unit):>10}"
                     f"{fmt(s.low, fig.unit):>10}{fmt(s.high, fig.unit):>10}  {fig.unit}")
    lines += ["", "  targets (judged on the median)"]
    for t in TARGETS:
        found = summaries.get(t.key)
        unit = next(f.unit for f in FIGURES if f.key == t.key)
        if found is None:
            measured, verdict = "not run", "-"
        else:
            ok = met(t, found)
            measured = (f"{fmt(found.median, unit)} "
                        f"({fmt(found.low, unit)}-{fmt(found.high, unit)})")
            verdict = "-" if ok is None else ("met" if ok else "NOT MET")
        need = f"{t.op} {fmt(t.threshold, unit)}{'' if unit in ('x', 'count') else ' ' + unit}"
        lines.append(f"  {t.number:<4}{t.text:<46}{measured:>24}  {need:<13}{verdict}")
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(summaries: Mapping[str, Summary], *, meta: dict[str, Any]) -> dict[str, Any]:
    figures = {}
    for fig in FIGURES:
        s = summaries.get(fig.key)
        if s is not None:
            figures[fig.key] = {"label": fig.label, "unit": fig.unit, "median": s.median,
                                "min": s.low, "max": s.high, "values": list(s.values)}
    targets = []
    for t in TARGETS:
        s = summaries.get(t.key)
        targets.append({
            "number": t.number, "target": t.text, "figure": t.key, "op": t.op,
            "threshold": t.threshold,
            "median": s.median if s else None, "min": s.low if s else None,
            "max": s.high if s else None, "met": met(t, s) if s else None,
        })
    return _clean({**meta, "figures": figures, "targets": targets})  # type: ignore[no-any-return]


def write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
