"""Bounded, strict JSON: what every body and payload from outside is parsed with."""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import strictjson
from bridge.errors import DepthError, PayloadError
from tests.support.hostile import hostile_bodies, json_values, nested


def strict_loads(text: bytes | str) -> Any:
    """A parser as strict as AWS IoT's or Go's: NaN and Infinity are errors."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_depth_limit_is_exact_and_ignores_brackets_in_strings() -> None:
    assert strictjson.loads(nested(64)).value is not None
    with pytest.raises(DepthError) as info:
        strictjson.loads(nested(65))
    assert "64 levels" in str(info.value)
    in_strings = json.dumps({"s": "[{" * 5000, "t": ["]}" * 5000]})
    assert strictjson.loads(in_strings).value["s"] == "[{" * 5000


def test_deep_nesting_is_refused_before_the_recursive_parse() -> None:
    # 100,000 levels would exhaust the C parser's recursion guard (RecursionError).
    with pytest.raises(DepthError):
        strictjson.loads(b"[" * 100_000 + b"]" * 100_000)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


# Strings of what the depth scan must see past: brackets, quotes and backslashes.
_tricky_text = st.text(st.sampled_from('[]{}"\\ab\n'), max_size=6)
_tricky = st.recursive(
    st.none() | st.integers() | _tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_tricky_text, inner,
                                                                max_size=3),
    max_leaves=24,
)


@given(_tricky, st.integers(0, 6), st.booleans())
@settings(max_examples=400, deadline=None)
def test_depth_scan_agrees_with_the_parsed_depth(value: Any, limit: int,
                                                 ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    if _depth(value) > limit:
        with pytest.raises(DepthError):
            strictjson.check_depth(raw, limit)
    else:
        strictjson.check_depth(raw, limit)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32",
                                      "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("depth", [1, 500, 980, 2000])
def test_utf16_and_utf32_are_refused_whatever_their_nesting(encoding: str, depth: int) -> None:
    # An escaped quote first: the depth scan, reading UTF-16 as UTF-8, mis-paired quotes
    # after it and let ~900 levels through to json, which decodes UTF-16/32 by itself.
    doc = '{"k":"\\"","x":' + nested(depth) + ',"z":"a"}'
    with pytest.raises(PayloadError) as info:
        strictjson.loads(doc.encode(encoding))
    assert "must be UTF-8" in str(info.value) or "64 levels" in str(info.value)


def test_utf8_with_a_bom_is_json_and_invalid_utf8_is_refused() -> None:
    assert strictjson.loads(b"\xef\xbb\xbf" + b'{"a": NaN}') == ({"a": None},
                                                                ["a: nan is not JSON; null"])
    for bad in (b'{"a": "\xff"}', b'{"a": "\xed\xa0\x80"}', b'{"a": NaN, "b": "\xc3("}'):
        with pytest.raises(PayloadError, match="not UTF-8"):
            strictjson.loads(bad)
    assert strictjson.loads('{"s": "\ud800"}').value == {"s": "\ud800"}  # str: as given


def test_non_finite_and_unsafe_numbers_become_null_with_notes() -> None:
    parsed = strictjson.loads(
        b'{"a": NaN, "b": [1, Infinity, -Infinity], "c": 1e400, "d": 9007199254740993,'
        b' "e": 9007199254740992, "f": 1.5e300}')
    assert parsed.value == {"a": None, "b": [1, None, None], "c": None, "d": None,
                            "e": 2**53, "f": 1.5e300}
    assert parsed.notes == ["a: nan is not JSON; null", "b[1]: inf is not JSON; null",
                            "b[2]: -inf is not JSON; null", "c: inf is not JSON; null",
                            "d: integer beyond ±2^53; null"]
    assert strict_loads(strictjson.dumps(parsed.value)) == parsed.value


def test_notes_are_bounded() -> None:
    parsed = strictjson.loads("[" + ",".join(["NaN"] * 5000) + "]")
    assert len(parsed.notes) == strictjson.MAX_NOTES + 1
    assert parsed.value == [None] * 5000


def test_duplicate_keys_last_wins() -> None:
    assert strictjson.loads(b'{"k": 1, "k": 2}').value == {"k": 2}


def test_dumps_refuses_nan_and_escapes_lone_surrogates() -> None:
    with pytest.raises(ValueError):
        strictjson.dumps({"x": float("nan")})
    assert strict_loads(strictjson.dumps({"s": "\ud800"})) == {"s": "\ud800"}


@given(st.binary(max_size=200) | hostile_bodies({"a": [1, {"b": "c"}], "n": 1}))
@settings(max_examples=500)
def test_any_bytes_parse_or_raise_payload_error_only(raw: bytes) -> None:
    try:
        parsed = strictjson.loads(raw)
    except PayloadError:
        return
    strict_loads(strictjson.dumps(parsed.value))  # whatever parses leaves as strict JSON


@given(json_values)
def test_clean_values_round_trip_strictly(value: Any) -> None:
    parsed = strictjson.loads(json.dumps(value))
    out = strict_loads(strictjson.dumps(parsed.value))
    assert out == parsed.value
    assert (parsed.notes == []) == (json.dumps(value) == json.dumps(out))


class _Named(str):
    """A str subclass (an enum's value, say): ``json`` writes it as its text."""

    def __str__(self) -> str:
        return "not what json writes"


@dataclasses.dataclass
class _Point:
    x: int


#: What code may hand to ``dumps``: any float (NaN too), integers past 64 bits, lone
#: surrogates, keys that are not strings, tuples, str subclasses, and what ``json``
#: refuses with TypeError (a datetime, a dataclass).
_written = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(min_value=-2**70, max_value=2**70)
    | st.text(max_size=8) | st.just("\ud800") | st.builds(_Named, st.text(max_size=4))
    | st.sampled_from([datetime.datetime(2026, 12, 6), _Point(1)]),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4) | st.integers() | st.booleans(), inner,
                      max_size=3),
    max_leaves=12,
)


@given(_written)
@settings(max_examples=500)
def test_dumps_writes_what_json_writes_and_refuses_what_it_refuses(value: Any) -> None:
    try:
        expected = json.loads(json.dumps(value, separators=(",", ":"), allow_nan=False))
    except (ValueError, TypeError) as refused:
        with pytest.raises(type(refused)):
            strictjson.dumps(value)
        return
    assert strict_loads(strictjson.dumps(value)) == expected


def _reference(text: str) -> strictjson.Parsed:
    """What ``loads`` must return: ``json``'s exact parse, cleaned."""
    notes: list[str] = []
    return strictjson.Parsed(strictjson.clean(json.loads(text), "", notes), notes)


_digits = st.text("0123456789", min_size=14, max_size=24)
#: Long runs of digits everywhere they can stand: integers (past 2^53 too), the digits of
#: floats (with or without an exponent), and strings (hex ids, serials, keys) where they
#: are only text.
_long_runs = st.recursive(
    st.integers(min_value=-2**63, max_value=2**64)
    | _digits.map(lambda d: float(f"0.{d}")) | _digits.map(lambda d: float(f"{d}.5"))
    | _digits | st.tuples(st.text("abcdef\"'", max_size=2), _digits,
                          st.text("abcdef ,]", max_size=2)).map("".join),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4) | _digits, inner, max_size=3),
    max_leaves=10,
)


@given(_long_runs, st.sampled_from([(None, (",", ":")), (None, (", ", ": ")),
                                   (1, (",", ": ")), ("\t", (" ,", " : "))]))
@settings(max_examples=500)
def test_long_digit_runs_parse_as_json_parses_them(value: Any, layout: Any) -> None:
    indent, separators = layout
    text = json.dumps(value, indent=indent, separators=separators)
    assert strictjson.loads(text) == _reference(text)
    assert strictjson.loads(text.encode()) == _reference(text)
