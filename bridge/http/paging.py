"""Pages of a list endpoint: ``{"items": [...], "next_cursor": str | null}`` and its cursor.

A cursor is opaque to clients: URL-safe base64 of the JSON list of the last item's sort
key. Pages are keyset pages (``WHERE key > last``), not offsets, so a robot updated or
added while a client pages neither repeats nor vanishes. :class:`Page` is the one
builder of that shape (:func:`answer` under it, for cursors made elsewhere); the other
half, fetching ``limit + 1`` rows after a key (SQL or in memory), is bridge/http/keyset.py.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from bridge import strictjson
from bridge.errors import InputError, PayloadError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

T = TypeVar("T")
U = TypeVar("U")


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


def answer(items: Sequence[Any], next_cursor: str | None) -> dict[str, Any]:
    """The product's list shape; every list answer is built here (through :class:`Page`
    unless the cursor is not a sort key, as a gateway command's own cursor)."""
    return {"items": list(items), "next_cursor": next_cursor}


class Page(NamedTuple, Generic[T]):
    """One keyset page: its items and the sort key to resume after (None: the last page).

    Unpacks as ``items, after``. A query fetches ``limit + 1`` items: :meth:`of` keeps
    ``limit`` and takes the one more as the sign of a next page."""

    items: list[T]
    after: list[Any] | None = None

    @classmethod
    def of(cls, fetched: Sequence[T], limit: int,
           key: Callable[[T], Sequence[Any]]) -> Page[T]:
        """The page of ``fetched`` (``limit + 1`` asked for); ``key``: an item's sort key."""
        kept = list(fetched[:limit])
        more = len(fetched) > limit and bool(kept)
        return cls(kept, list(key(kept[-1])) if more else None)

    def map(self, show: Callable[[T], U]) -> Page[U]:
        """The same page with each item as ``show`` makes it (a row to its answer)."""
        return Page([show(item) for item in self.items], self.after)

    def body(self, show: Callable[[T], Any] | None = None) -> dict[str, Any]:
        """The answer: ``{"items", "next_cursor"}``; ``show``: an item's public form."""
        items = self.items if show is None else [show(item) for item in self.items]
        return answer(items, None if self.after is None else encode_cursor(self.after))


def page(items: list[dict[str, Any]], limit: int, key: list[str]) -> dict[str, Any]:
    """The answer for ``items`` fetched with ``limit + 1`` rows: one more means a next page."""
    return Page.of(items, limit, lambda item: [item[k] for k in key]).body()
