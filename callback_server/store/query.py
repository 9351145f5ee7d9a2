"""The WHERE clause of a list query: filters, the caller's org scope, the keyset position.

Every SQL list of the callback server (robots, events, history, poll runs, alerts,
delivery logs) pages the same way: a keyset condition after the last page's sort key,
``ORDER BY`` that key, one row more than the page holds (the one more says a next page
follows; bridge.http.paging.Page cuts it off): bridge.http.keyset writes those for both
services. An API key covering some orgs sees only their rows, and one covering none sees
nothing, without a query: written here once.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from bridge.http import keyset
from callback_server.store.dialect import Dialect

__all__ = ["Where"]


class Where:
    """Conditions ANDed into one clause, each with its arguments, in order."""

    def __init__(self, dialect: Dialect) -> None:
        self.mark = dialect.mark
        self.terms: list[str] = []
        self.args: list[Any] = []
        #: The org scope leaves nothing to see: answer an empty page, ask nothing.
        self.nothing = False

    def add(self, term: str, *args: Any) -> Where:
        """A condition written by the caller, its placeholders filled by ``args``."""
        self.terms.append(term)
        self.args.extend(args)
        return self

    def equal(self, column: str, value: Any) -> Where:
        """``column = value``, unless ``value`` is None (no filter)."""
        return self if value is None else self.add(f"{column} = {self.mark}", value)

    def orgs(self, orgs: Collection[str] | None) -> Where:
        """The caller's org scope: None sees every org, an empty one nothing."""
        if orgs is None:
            return self
        if not orgs:
            self.nothing = True
            return self
        return self.add(f"org_id IN ({', '.join([self.mark] * len(orgs))})", *sorted(orgs))

    def after(self, key: Sequence[Any] | None, *columns: str,
              descending: bool = False) -> Where:
        """Rows past ``key`` in the order of ``columns`` (all ascending or all
        descending): ``(a > ? OR (a = ? AND (b > ? ...)))``; None: from the start."""
        if key is None:
            return self
        term, args = keyset.after(key, columns, self.mark, descending=descending)
        return self.add(term, *args)

    def sql(self) -> str:
        """`` WHERE ...`` (or nothing), to follow the FROM."""
        return f" WHERE {' AND '.join(self.terms)}" if self.terms else ""

    @staticmethod
    def page(order: str, limit: int) -> str:
        """``ORDER BY`` the sort key and one row more than the page holds."""
        return keyset.order_limit(order, limit)
