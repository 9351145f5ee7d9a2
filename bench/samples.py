"""Callback bodies for load: the Pudu samples in tests/samples/pudu, made unique per request.

Every request gets its own robot time (milliseconds, strictly increasing) and, for
events, its own ``error_id``, so neither the edge's dedup (body hash, TraceId) nor the
stable message ids downstream ever fold two requests into one. Serial numbers cycle
through a fixed fleet (``robots``) tagged with the run, so state rows are updated as in
a real fleet and two runs never share an id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.envelope import Envelope
from bridge.pudu.normalize import normalize
from bridge.topic import TopicScheme

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "tests" / "samples" / "pudu"
WEBHOOK_PATH = "/api/pudu/webhook"
CALLBACK_CODE = "bench-callback-code"

# A fleet mostly reports pose, power and status; events and task changes are rarer.
# Samples not named here weigh 1.
WEIGHTS: dict[str, int] = {
    "notifyRobotPose.json": 4,
    "notifyRobotPower.json": 2,
    "notifyRobotPower__1.json": 2,
    "robotStatus.json": 2,
    "notifyRobotStatus__1.json": 2,
    "notifyRobotMoveState__1.json": 2,
}

_SN, _TS, _EID = "@@BENCH-SN@@", "@@BENCH-TS@@", "@@BENCH-EID@@"
_SLOTS = {f'"{_SN}"': "sn", f'"{_TS}"': "ts", f'"{_EID}"': "eid"}


@dataclass(frozen=True, slots=True)
class Template:
    """One sample as literal pieces with slots between them (``sn``, ``ts``, ``eid``)."""

    name: str
    pieces: tuple[str, ...]
    slots: tuple[str, ...]

    def render(self, values: dict[str, str]) -> str:
        out = [self.pieces[0]]
        for slot, piece in zip(self.slots, self.pieces[1:], strict=True):
            out.append(values[slot])
            out.append(piece)
        return "".join(out)


def _mark(data: dict[str, Any]) -> None:
    if "sn" in data:
        data["sn"] = _SN
    for key in ("timestamp", "notify_timestamp"):
        if key in data:
            data[key] = _TS
    if "error_id" in data:
        data["error_id"] = _EID
    ext = data.get("extend_info")
    if isinstance(ext, dict) and "sn" in ext:
        ext["sn"] = _SN


def _split(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    pieces: list[str] = []
    slots: list[str] = []
    rest = text
    while True:
        hits = [(rest.find(marker), marker) for marker in _SLOTS if marker in rest]
        if not hits:
            pieces.append(rest)
            return tuple(pieces), tuple(slots)
        at, marker = min(hits)
        pieces.append(rest[:at])
        slots.append(_SLOTS[marker])
        rest = rest[at + len(marker):]


def load_templates(directory: Path = SAMPLES_DIR) -> list[Template]:
    """Every sample under ``directory`` (recursively), in a stable order."""
    templates = []
    for path in sorted(directory.rglob("*.json")):
        body = json.loads(path.read_text())
        data = body.get("data")
        if not isinstance(data, dict):
            continue
        data.setdefault("sn", "")
        data.setdefault("timestamp", 0)
        _mark(data)
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        pieces, slots = _split(text)
        templates.append(Template(path.name, pieces, slots))
    if not templates:
        raise FileNotFoundError(f"no Pudu samples under {directory}")
    return templates


def weighted_cycle(templates: list[Template]) -> list[int]:
    """Template indices, each repeated by its weight and interleaved (a fixed mix)."""
    counts = [WEIGHTS.get(t.name, 1) for t in templates]
    cycle: list[int] = []
    for round_ in range(max(counts)):
        cycle.extend(i for i, c in enumerate(counts) if c > round_)
    return cycle


class BodyFactory:
    """``body(n)``: the n-th request body of this run (deterministic, unique per n)."""

    def __init__(self, *, robots: int = 1000, tag: str | None = None,
                 base_ms: int | None = None) -> None:
        self.templates = load_templates()
        self.cycle = weighted_cycle(self.templates)
        self.robots = robots
        self.tag = tag or format(int(time.time() * 1000) % 36**6, "x")
        self.base_ms = base_ms if base_ms is not None else int(time.time() * 1000)

    def sn(self, n: int) -> str:
        return f"B{self.tag}R{n % self.robots:05d}"

    def body(self, n: int) -> bytes:
        template = self.templates[self.cycle[n % len(self.cycle)]]
        values = {"sn": f'"{self.sn(n)}"', "ts": str(self.base_ms + n), "eid": f'"e{n}"'}
        return template.render(values).encode()

    def trace_id(self, n: int) -> str:
        return f"bench-{self.tag}-{n}"

    def lua_script(self, path: str = WEBHOOK_PATH, code: str = CALLBACK_CODE,
                   threads: int = 1) -> str:
        """The same mix as ``body(n)`` for wrk: one Lua function per template."""
        funcs = []
        for t in self.templates:
            parts = [_lua_string(t.pieces[0])]
            for slot, piece in zip(t.slots, t.pieces[1:], strict=True):
                parts.append({"sn": '"\\"" .. sn .. "\\""', "ts": "ts",
                              "eid": '"\\"e" .. n .. "\\""'}[slot])
                parts.append(_lua_string(piece))
            funcs.append(f"  function(sn, ts, n) return {' .. '.join(parts)} end,")
        cycle = ", ".join(str(i + 1) for i in self.cycle)
        return _LUA.format(
            funcs="\n".join(funcs), cycle=cycle, robots=self.robots, tag=self.tag,
            base_ms=self.base_ms, path=path, code=code, threads=threads,
        )


def _lua_string(text: str) -> str:
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


_LUA = """-- generated by bench/samples.py: the Pudu sample mix, unique sn/ts/error_id per request
local templates = {{
{funcs}
}}
local cycle = {{ {cycle} }}
local ncycle = #cycle
local counter = 0
local threads = {threads}
local headers = {{}}
headers["Content-Type"] = "application/json"
headers["CallbackCode"] = "{code}"

local next_id = 0
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end

function request()
  local n = counter * threads + (tid or 0)
  counter = counter + 1
  local sn = string.format("B{tag}R%05d", n % {robots})
  local ts = string.format("%d", {base_ms} + n)
  local body = templates[cycle[(n % ncycle) + 1]](sn, ts, n)
  headers["TraceId"] = "bench-{tag}-" .. n
  return wrk.format("POST", "{path}", headers, body)
end
"""


def envelopes(count: int, *, org: str, gateway: str = "gw-bench", robots: int = 1000,
              tag: str | None = None, prefix: str = "") -> Iterator[tuple[str, bytes, str | None]]:
    """``(topic, payload, compact_key)`` as the edge agent would store them, in ts order."""
    factory = BodyFactory(robots=robots, tag=tag)
    scheme = TopicScheme(org, prefix)
    now = time.time()
    for n in range(count):
        norm = normalize(json.loads(factory.body(n)), received_at=now)
        device = norm.device_id or gateway
        env = Envelope(
            id=norm.message_id, type=norm.callback_type, org=org, device=device,
            gateway=gateway, ts=norm.ts, received_at=now, data=norm.data, raw=norm.raw,
            channel=norm.channel,
        )
        yield str(scheme.device(device, norm.channel)), env.to_json(), norm.compact_key
