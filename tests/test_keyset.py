"""bridge.http.keyset: a keyset page of a list, SQL or in memory, walked by its cursors,
gives every item once, in order, whatever the page size."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from bridge.http import keyset
from bridge.http.paging import Page, decode_cursor, encode_cursor

ITEMS = [{"org": org, "id": f"g{n}"} for org in ("acme", "beta", "b") for n in (3, 1, 2, 10)]


def key(item: dict[str, Any]) -> list[str]:
    return [item["org"], item["id"]]


@pytest.mark.parametrize("limit", [1, 2, 5, 12, 13, 100])
def test_in_memory_pages_give_each_item_once_in_order(limit: int) -> None:
    seen, cursor, pages = [], None, 0
    while True:
        page = keyset.page_of(ITEMS, key, decode_cursor(cursor, (str,), (str,)), limit)
        assert len(page.items) <= limit
        seen += page.items
        pages += 1
        cursor = page.body()["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ITEMS, key=key)
    assert pages == max(1, -(-len(ITEMS) // limit))  # no empty last page


@pytest.mark.parametrize("limit", [1, 3, 7, 50])
def test_sql_pages_newest_first_through_ties(limit: int) -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE runs (started REAL, run_id TEXT)")
    rows = [(float(t), f"r{i}") for i, t in enumerate([5, 5, 5, 4, 9, 9, 1, 2, 2, 7])]
    db.executemany("INSERT INTO runs VALUES (?, ?)", rows)
    seen: list[tuple[float, str]] = []
    after: list[Any] | None = None
    while True:
        where = ""
        args: list[Any] = []
        if after is not None:
            term, args = keyset.after(after, ("started", "run_id"), descending=True)
            where = f" WHERE {term}"
        fetched = db.execute(f"SELECT started, run_id FROM runs{where}"
                             f"{keyset.order_limit('started DESC, run_id DESC', limit)}",
                             args).fetchall()
        assert len(fetched) <= limit + 1
        page = Page.of(fetched, limit, lambda r: list(r))
        seen += page.items
        if page.after is None:
            break
        after = decode_cursor(encode_cursor(page.after), (float, int), (str,))
    assert seen == sorted(rows, reverse=True)
