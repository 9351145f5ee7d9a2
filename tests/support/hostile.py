"""Hypothesis strategies for what a hostile or buggy sender sends: poison envelopes in
distinct fault classes, and byte-level mutations of JSON bodies."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=12,
)
# Finite floats only: a NaN becomes null on the way in, and a null gateway or channel is
# valid (it defaults), so NaN there is no fault.
not_strings = st.booleans() | st.floats(allow_nan=False, allow_infinity=False) \
    | st.lists(json_scalars, max_size=2) \
    | st.dictionaries(st.text(max_size=4), json_scalars, max_size=2)


#: Encodings json.loads would auto-detect; outside data must be UTF-8 (RFC 8259 §8.1).
WIDE_ENCODINGS = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")


def nested(depth: int, leaf: str = "1") -> str:
    """JSON text nested ``depth`` levels, alternating arrays and objects."""
    text = leaf
    for i in range(depth):
        text = f"[{text}]" if i % 2 else f'{{"k":{text}}}'
    return text


def valid_envelope(org_id: str, device_id: str, n: int, **fields: Any) -> dict[str, Any]:
    """A well-formed envelope (the base every fault class breaks in one way)."""
    env = {"v": 1, "id": f"env-{device_id}-{n}", "type": "notifyRobotPower", "channel": "power",
           "org": org_id, "device": device_id, "gateway": "gw", "ts": 1_700_000_000 + n,
           "received_at": 1_700_000_001 + n, "data": {"battery_level": 50}, "raw": {"power": 50}}
    env.update(fields)
    return env


Poison = Callable[[str, str, int], bytes]  # (org, device, n) -> payload


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # allow_nan: NaN literals are part of the attack


def _field_set(key: str, bad: Any) -> Poison:
    """A valid envelope whose ``key`` holds ``bad``."""
    return lambda org, dev, n: _dumps(valid_envelope(org, dev, n, **{key: bad}))


#: fault class -> strategy of (marker -> payload bytes) builders. Each payload is broken in
#: exactly the way its class names; the marker makes every generated payload distinct.


def _fault_classes() -> dict[str, st.SearchStrategy[Poison]]:
    def env_with(**strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Poison]:
        return st.fixed_dictionaries(strategies).map(
            lambda fields: lambda org, dev, n: _dumps(valid_envelope(org, dev, n, **fields)))

    def without(key: str) -> st.SearchStrategy[Poison]:
        def build(org: str, dev: str, n: int) -> bytes:
            env = valid_envelope(org, dev, n)
            env.pop(key)
            return _dumps(env)
        return st.just(build)

    return {
        "raw bytes": st.binary(max_size=64).map(
            lambda b: lambda org, dev, n: b"\xff#%d#" % n + b),
        "truncated JSON": st.integers(1, 60).map(
            lambda cut: lambda org, dev, n: _dumps(valid_envelope(org, dev, n))[:-cut]),
        "schema version not 1": env_with(v=st.sampled_from(["x", 1.5, 2, 0, [], {}, True])),
        "number out of range": st.tuples(
            st.sampled_from([b"v", b"ts"]),
            st.sampled_from([b"1e400", b"-1e999", b"9" * 400, b"-" + b"9" * 20])).map(
            lambda kv: lambda org, dev, n: _dumps(valid_envelope(org, dev, n, **{
                kv[0].decode(): "__N__"})).replace(b'"__N__"', kv[1])),
        "ts NaN or Infinity": env_with(ts=st.sampled_from([float("nan"), float("inf"),
                                                           float("-inf")])),
        "ts not a number": env_with(ts=st.text(min_size=1, max_size=8).filter(
            lambda t: not _is_number(t)) | st.booleans() | st.lists(st.integers(), max_size=2)),
        "deep nesting in data": st.integers(65, 1500).map(
            lambda depth: lambda org, dev, n: (
                b'{"v":1,"id":"d%d","type":"t","org":"%s","device":"%s","ts":1,"data":%s}'
                % (n, org.encode(), dev.encode(), nested(depth).encode()))),
        "UTF-16/32, deep data": st.tuples(st.integers(1, 1500),
                                          st.sampled_from(WIDE_ENCODINGS)).map(
            lambda de: lambda org, dev, n: (
                f'{{"v":1,"id":"w{n}","type":"t","org":"{org}","device":"{dev}","ts":1,'
                f'"data":{{"q":"\\"","x":{nested(de[0])},"z":"a"}}}}').encode(de[1])),
        "deep nesting at the top": st.integers(65, 3000).map(
            lambda depth: lambda org, dev, n: nested(depth, str(n)).encode()),
        "required field missing": st.sampled_from(["id", "type", "org", "device", "ts"]).flatmap(
            without),
        "id or names not strings": st.sampled_from(["id", "type", "device", "gateway",
                                                    "channel"]).flatmap(
            lambda key: not_strings.filter(lambda v: v not in (None, "", [], {}, False, 0.0))
            .map(functools.partial(_field_set, key))),
        "data or raw not objects": st.sampled_from(["data", "raw"]).flatmap(
            lambda key: st.sampled_from([[1], "x", 5, True]).map(
                functools.partial(_field_set, key))),
        "org or device unlike the topic": st.sampled_from(["org", "device"]).map(
            lambda key: lambda org, dev, n: _dumps(
                valid_envelope(org, dev, n, **{key: f"other{n}"}))),
        "not an object": json_values.filter(lambda v: not isinstance(v, dict)).map(
            lambda v: lambda org, dev, n: _dumps([n, v])),
        "notes not strings": env_with(notes=st.sampled_from([[1], "x", [None], {"a": 1}])),
        "integer over 4300 digits": st.integers(4301, 6000).map(
            lambda digits: lambda org, dev, n: (
                b'{"v":1,"id":"i%d","type":"t","org":"%s","device":"%s","ts":%s}'
                % (n, org.encode(), dev.encode(), b"9" * digits))),
        "duplicate key, last one bad": st.sampled_from([b'"v":"x"', b'"ts":"later"',
                                                        b'"data":[]']).map(
            lambda bad: lambda org, dev, n: _dumps(valid_envelope(org, dev, n))[:-1]
            + b"," + bad + b"}"),
    }


FAULT_CLASSES = _fault_classes()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def collect(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` examples drawn by hypothesis's engine (generate phase only)."""
    out: list[Any] = []

    @given(strategy)
    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    def draw(value: Any) -> None:
        out.append(value)

    draw()
    return out


def poison_payloads(org: str, device: str, per_class: int) -> list[tuple[str, bytes]]:
    """(fault class, payload) pairs, ``per_class`` of each class, all distinct."""
    out: list[tuple[str, bytes]] = []
    seen: set[bytes] = set()
    n = 0
    for name, strategy in FAULT_CLASSES.items():
        builds = collect(strategy, per_class)  # fewer when the class's space is small
        for i in range(per_class):
            build = builds[i % len(builds)]
            n += 1  # in every payload: distinct even where the fault itself repeats
            payload = build(org, device, n)
            if payload not in seen:
                seen.add(payload)
                out.append((name, payload))
    return out


# -- body-level mutations for the HTTP fuzz ----------------------------------------------------
def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    """A JSON body broken at the byte level the ways parsers trip over."""
    text = base.decode()
    return st.one_of(
        st.integers(60, 5000).map(lambda d: text.replace("1", nested(d), 1).encode()),
        st.integers(60, 5000).map(lambda d: nested(d).encode()),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" * 400,
                         "9" * 5000, "123456789012345678901234567890", "1e-400"]).map(
            lambda lit: text.replace("1", lit, 1).encode()),
        st.sampled_from(['"x"', "null", "[]", "{}", "true", '"\\ud800"']).map(
            lambda v: (text[:-1] + ',"' + _first_key(text) + '":' + v + "}").encode()),
        st.binary(min_size=1, max_size=16).map(lambda junk: base[: len(base) // 2] + junk),
        st.integers(1, max(1, len(base) - 1)).map(lambda cut: base[:cut]),
        st.just(b"\xff\xfe" + base), st.just(base.replace(b'"', b"\xc3(", 1)),
        # UTF-16/32, deep, after an escaped quote (which once misled the depth scan)
        st.tuples(st.integers(1, 1500), st.sampled_from(WIDE_ENCODINGS)).map(
            lambda de: _with_escaped_quote(text.replace("1", nested(de[0]), 1)).encode(de[1])),
    )


def _with_escaped_quote(text: str) -> str:
    """``text`` (a JSON object) with a first member holding an escaped quote."""
    return '{"q":"\\"",' + text[1:] if text.startswith("{") else text


def _first_key(text: str) -> str:
    return text.split('"')[1] if '"' in text else "k"


def hostile_bodies(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Mutations of the JSON text of ``base`` (which should contain a ``1``)."""
    return _mutations(json.dumps(base, separators=(",", ":")).encode())
