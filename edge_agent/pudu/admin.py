"""``POST /pudu/poll`` on the admin listener: one reconciliation now (``edge-agent poll``)."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Header, Query

from bridge.errors import AuthError, ConfigError, ConflictError
from bridge.http.paging import DEFAULT_LIMIT, MAX_LIMIT, Number, Page, Text, decode_cursor
from edge_agent.ports import PuduAgent, PuduHost

router = APIRouter(prefix="/pudu", tags=["pudu"])


def _check(agent: PuduHost, authorization: str | None) -> None:
    """With ``PROXY_TOKEN`` set, the routes want it as a bearer token."""
    token = agent.settings.proxy_token
    if token is None:
        return  # the admin listener is bound to localhost by default
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise AuthError("missing or invalid bearer token", bearer=True)


@router.post("/poll", summary="Run one reconciliation now and return its record")
async def poll(agent: PuduAgent,
               authorization: str | None = Header(default=None)) -> dict[str, Any]:
    _check(agent, authorization)
    try:
        return await agent.poller.run_once()
    except ConfigError as exc:  # no shops: nothing was polled, so not a success
        raise ConflictError(str(exc), field="PUDU_SHOP_IDS") from exc


@router.get("/runs", summary="Run records, newest first, a page at a time")
async def runs(agent: PuduAgent, limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
               cursor: str | None = Query(None, max_length=1000),
               authorization: str | None = Header(default=None)) -> dict[str, Any]:
    _check(agent, authorization)
    after = decode_cursor(cursor, Number, Text)
    items, last = await agent.journal.runs(
        limit, None if after is None else (float(after[0]), str(after[1])))
    return Page(items, last).body()
