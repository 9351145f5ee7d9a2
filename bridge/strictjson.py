"""Strict JSON in and out: bounded parsing for outside data, RFC 8259 for what we emit.

Python's ``json`` parses ~1,000 levels of nesting before it raises RecursionError (not
ValueError), reads ``NaN``/``Infinity``/``1e400`` as non-finite floats, and writes them
back as bare ``NaN``, which strict consumers (AWS IoT rules, Go, Java) refuse. So every
body, header-carried or MQTT payload that enters from outside is parsed here:

- bytes must be UTF-8 (RFC 8259 §8.1; a UTF-8 BOM is allowed): ``json.loads`` would
  auto-detect UTF-16/32, which the depth scan (it reads UTF-8) cannot bracket-count, so
  a UTF-16 body could carry 900 levels past it;
- nesting deeper than ``MAX_DEPTH`` is refused *before* the recursive parse, by a scan
  that costs two ``bytes.count`` calls on an ordinary body;
- NaN, ±Infinity and integers beyond ±2^53 (where IEEE doubles, hence most JSON
  consumers, stop being exact) become ``null``, and each change is described in a note
  (``"data.x: nan is not JSON; null"``) that the envelope carries in ``notes``.

Duplicate keys: the last one wins, as in ``json``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

import orjson

from bridge.errors import DepthError, PayloadError

__all__ = ["MAX_DEPTH", "MAX_NOTES", "SAFE_INT", "Parsed", "check_depth", "clean", "dumps",
           "loads"]

#: Deepest nesting accepted from outside; Pudu's deepest callback nests 4 levels.
MAX_DEPTH = 64
#: Largest integer magnitude kept as a number (2^53: exact in an IEEE double).
SAFE_INT = 2**53
#: Notes kept per document; a body with 10,000 NaNs gets a count, not 10,000 notes.
MAX_NOTES = 20

# Digits as "0": a run of 16 means an integer (or mantissa) no double may hold exactly,
# found by a C substring search instead of a regex over every digit (~9 µs a body).
_SHAPE = bytes.maketrans(b"123456789", b"000000000")
_DIGITS16 = b"0" * 16
_NOT_DIGIT = re.compile(rb"[^0]")
# What may stand before and after the digits of a number (RFC 8259 §6): a run with
# anything else beside it (a letter, a quote) is inside a string.
_NUMBER_BEFORE = frozenset(b"-+.eE:,[ \t\r\n")
_NUMBER_AFTER = frozenset(b".eE,]} \t\r\n")
_NOT_MARKS = bytes(set(range(256)) - set(b'"[]{}'))
_OPENERS = frozenset(b"[{")
_BOM = b"\xef\xbb\xbf"


class Parsed(NamedTuple):
    """A parsed document and what was changed to keep it strict JSON.

    A NamedTuple, not a frozen dataclass: it is built once per callback on the hot path.
    """

    value: Any
    notes: list[str]


def check_depth(raw: bytes, limit: int = MAX_DEPTH) -> None:
    """DepthError if ``raw`` nests deeper than ``limit``; brackets in strings do not count.

    Each step is one C pass over the bytes (a 125 KiB batch frame in ~0.4 ms where a
    regex and a loop over every byte took 3.6): Python only walks the brackets.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return  # cannot be deeper than it has openers: the common case, ~1 µs
    if b"\\" in raw:  # escaped backslashes, then escaped quotes: the quotes left delimit
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Quotes and brackets only. Two quotes in a row move no bracket into or out of a
    # string, so dropping them leaves quotes only where a string holds a bracket.
    marks = raw.translate(None, _NOT_MARKS).replace(b'""', b"")
    if b'"' in marks:
        marks = b"".join(marks.split(b'"')[::2])  # the odd pieces are inside strings
    depth = 0
    for byte in marks:
        if byte in _OPENERS:
            depth += 1
            if depth > limit:
                raise DepthError(limit)
        else:
            depth -= 1


def loads(raw: bytes | str, *, max_depth: int = MAX_DEPTH) -> Parsed:
    """Parse outside data: PayloadError (DepthError) if it is not bounded UTF-8 JSON.

    Bytes in another encoding (UTF-16/32), invalid UTF-8 and ValueError from ``json``
    become PayloadError too, so callers handle one exception type for every way a body
    can be bad.
    """
    text: str | None = None
    if isinstance(raw, str):
        text, data = raw, raw.encode("utf-8", "surrogatepass")
    else:
        data = raw[3:] if raw.startswith(_BOM) else raw
    check_depth(data, max_depth)  # exact for UTF-8; other encodings are refused below
    try:
        # orjson refuses NaN, Infinity, 1e400, lone surrogates and anything not UTF-8,
        # and is ~3x faster: what it takes, short of 16-digit integers, is strict JSON.
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    else:
        if not _long_number(data):
            return Parsed(value, [])
    if text is None:
        text = _utf8(data)
    try:  # the slow path: exact big integers, NaN literals, surrogates (json takes them)
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    notes: list[str] = []
    return Parsed(clean(value, "", notes), notes)


def _long_number(data: bytes) -> bool:
    """Whether ``data`` may hold a number of 16 digits or more (a run with what a number
    may have beside it), which ``json`` must parse exactly.

    A run inside a string does not count: the 32-digit hex ids of one envelope in 250
    hold one, so one batch frame of 60 in five took the slow path for nothing.
    """
    shape = data.translate(_SHAPE)
    at = shape.find(_DIGITS16)
    while at >= 0:
        after = _NOT_DIGIT.search(shape, at + len(_DIGITS16))
        end = after.start() if after else len(data)
        if ((at == 0 or data[at - 1] in _NUMBER_BEFORE)
                and (end == len(data) or data[end] in _NUMBER_AFTER)):
            return True
        at = shape.find(_DIGITS16, end)
    return False


def _utf8(data: bytes) -> str:
    """``data`` decoded as strict UTF-8; PayloadError naming the encoding otherwise."""
    encoding = json.detect_encoding(data)  # BOMs and NUL patterns of UTF-16/32
    if not encoding.startswith("utf-8"):
        raise PayloadError(f"not JSON: {encoding.upper()}, and JSON from outside must be "
                           "UTF-8 (RFC 8259 §8.1)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"not JSON: not UTF-8 ({exc.reason} at byte {exc.start})") \
            from None


def clean(value: Any, path: str, notes: list[str]) -> Any:
    """``value`` with NaN/±Infinity and unsafe integers replaced by None, in place.

    Each replacement appends a note naming its path. Recursion is bounded by the caller
    (a value from ``loads`` nests at most MAX_DEPTH levels).
    """
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):
            _note(notes, f"{path or 'value'}: {value!r} is not JSON; null")
            return None
    elif kind is int:
        if abs(value) > SAFE_INT:
            _note(notes, f"{path or 'value'}: integer beyond ±2^53; null")
            return None
    elif kind is dict:
        for key, item in value.items():
            if type(item) in _CONTAINERS_AND_NUMBERS:
                value[key] = clean(item, f"{path}.{key}" if path else str(key), notes)
    elif kind is list:
        for i, item in enumerate(value):
            if type(item) in _CONTAINERS_AND_NUMBERS:
                value[i] = clean(item, f"{path}[{i}]", notes)
    return value


_CONTAINERS_AND_NUMBERS = (float, int, dict, list)


def _note(notes: list[str], note: str) -> None:
    if len(notes) < MAX_NOTES:
        notes.append(note[:200])
    elif len(notes) == MAX_NOTES:
        notes.append("more values were changed; see raw for the rest")


#: What orjson would write and ``json`` refuses (TypeError): left to ``json``.
_EXACT = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def dumps(obj: Any) -> bytes:
    """Compact RFC 8259 JSON as UTF-8; ValueError on NaN/Infinity (clean first).

    A lone surrogate (``"\\ud800"``) is valid JSON but not UTF-8: then everything
    non-ASCII is escaped instead.

    orjson writes it (an envelope in ~1 µs where ``json`` takes ~6.6, on the edge's
    path once per accepted callback); what orjson refuses (integers beyond 64 bits, a
    lone surrogate, a key that is not a string, a datetime or a dataclass) and any
    document with a ``null`` in it (orjson writes NaN as ``null`` where this must
    refuse it) go to ``json``, which decides as before.
    """
    try:
        data = orjson.dumps(obj, option=_EXACT)
    except orjson.JSONEncodeError:
        pass
    else:
        if b"null" not in data:
            return data
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
