"""Target 6: what bounded, strict parsing costs on the webhook's hot path.

The edge parses every callback with ``bridge.strictjson.loads`` (a nesting-depth scan
before the parse, a NaN/unsafe-integer walk only when the bytes hint at one) instead of
bare ``json.loads``. Both parse the same bodies of the bench's sample mix in the same
process, alternating in blocks so drift hits both alike; the figure judged is the extra
CPU per body against the ~310 µs a durable accept costs (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from bench.samples import BodyFactory
from bench.settings import RunContext
from bridge import strictjson

BODIES = 2_000
BLOCKS = 10


def _cpu_us(parse: Callable[[bytes], object], bodies: list[bytes]) -> float:
    start = time.process_time()
    for body in bodies:
        parse(body)
    return (time.process_time() - start) / len(bodies) * 1e6


def run(ctx: RunContext) -> dict[str, float]:
    factory = BodyFactory(robots=ctx.settings.robots, tag=f"parse{ctx.run}")
    bodies = [factory.body(n) for n in range(BODIES)]
    plain: list[float] = []
    strict: list[float] = []
    for _ in range(BLOCKS if not ctx.settings.quick_mode else 2):
        plain.append(_cpu_us(json.loads, bodies))
        strict.append(_cpu_us(strictjson.loads, bodies))
    json_us, strict_us = min(plain), min(strict)  # least disturbed block of each
    return {
        "parsing.json_us": json_us,
        "parsing.strict_us": strict_us,
        "parsing.overhead_us": strict_us - json_us,
        "parsing.strict_vs_json": strict_us / json_us,
    }
