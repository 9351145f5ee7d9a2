"""Keyset pages, fetched: the rows after the last page's sort key, and one more.

The other half of bridge/http/paging.py (which cuts the one more off and makes the
cursor): every list of the product, SQL or in memory, on either service, asks for its
page here, so "after the key" and "``limit + 1``" are written once (the callback
server's queries through ``callback_server.store.query.Where``, the edge's poll-run
journal directly, the in-memory lists with :func:`page_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from bridge.http.paging import Page

__all__ = ["after", "order_limit", "page_of"]

T = TypeVar("T")


def after(key: Sequence[Any], columns: Sequence[str], mark: str = "?", *,
          descending: bool = False) -> tuple[str, list[Any]]:
    """The SQL condition for rows past ``key`` in the order of ``columns`` (all ascending
    or all descending), ``(a > ? OR (a = ? AND (b > ? ...)))``, and its arguments."""
    op = "<" if descending else ">"
    term = f"{columns[-1]} {op} {mark}"
    args: list[Any] = [key[-1]]
    for column, value in zip(reversed(columns[:-1]), reversed(key[:-1]), strict=True):
        term = f"({column} {op} {mark} OR ({column} = {mark} AND {term}))"
        args = [value, value, *args]
    return term, args


def order_limit(order: str, limit: int) -> str:
    """``ORDER BY`` the sort key and one row more than the page holds (the sign that a
    next page follows, which :meth:`Page.of` takes off)."""
    return f" ORDER BY {order} LIMIT {int(limit) + 1}"


def page_of(items: Iterable[T], key: Callable[[T], Sequence[Any]],
            start: Sequence[Any] | None, limit: int) -> Page[T]:
    """The page of in-memory ``items`` in ascending ``key`` order after ``start`` (a
    decoded cursor; None: from the first)."""
    ordered = sorted(items, key=lambda item: list(key(item)))
    if start is not None:
        ordered = [item for item in ordered if list(key(item)) > list(start)]
    return Page.of(ordered[:int(limit) + 1], limit, key)
