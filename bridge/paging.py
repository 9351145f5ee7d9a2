"""Pages of a list endpoint: ``{"items": [...], "next_cursor": str | null}`` and its cursor.

A cursor is opaque to clients: URL-safe base64 of the JSON list of the last item's sort
key. Pages are keyset pages (``WHERE key > last``), not offsets, so a robot updated or
added while a client pages neither repeats nor vanishes.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from bridge import strictjson
from bridge.errors import InputError, PayloadError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def encode_cursor(key: list[Any]) -> str:
    """The cursor that resumes after the item whose sort key is ``key``."""
    raw = json.dumps(key, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


#: What one position of a sort key may hold, for :func:`decode_cursor`.
Text = (str,)
Number = (int, float)
MaybeText = (str, type(None))
MaybeNumber = (int, float, type(None))


def decode_cursor(cursor: str | None, *shape: tuple[type, ...]) -> list[Any] | None:
    """The sort key inside ``cursor`` (None for the first page); 422 if it is not one.

    ``shape`` gives the types each position may hold: a cursor is sent back by the
    client, so one made by hand (``[1, 2]`` where names are expected) must be refused
    here, not reach a comparison or a query as the wrong type.
    """
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = strictjson.loads(raw).value  # a client sends it back: bounded parse
    except (binascii.Error, ValueError, PayloadError):
        key = None
    if not isinstance(key, list) or len(key) != len(shape) or not all(
            isinstance(v, types) and not isinstance(v, bool)
            for v, types in zip(key, shape, strict=True)):
        raise InputError("cursor is not one this endpoint returned", field="cursor")
    return key


def page(items: list[dict[str, Any]], limit: int, key: list[str]) -> dict[str, Any]:
    """The answer for ``items`` fetched with ``limit + 1`` rows: one more means a next page."""
    more = len(items) > limit
    items = items[:limit]
    cursor = encode_cursor([items[-1][k] for k in key]) if more and items else None
    return {"items": items, "next_cursor": cursor}
