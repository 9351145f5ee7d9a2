"""``/pudu/*`` on the admin listener: one reconciliation now (``edge-agent poll``) and the
run records. With ``PROXY_TOKEN`` set they want it as a bearer token, checked by the one
dependency the REST MQTT proxy's routes use too (``bridge.proxy.http.ListenerToken``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from bridge.errors import ConfigError, ConflictError
from bridge.http.paging import DEFAULT_LIMIT, MAX_LIMIT, Number, Page, Text, decode_cursor
from bridge.proxy.http import ListenerToken
from edge_agent.ports import PuduAgent


async def _bind_token(request: Request, agent: PuduAgent) -> None:
    """The listener's token for ``ListenerToken`` (None without PROXY_TOKEN: the admin
    listener is bound to localhost by default)."""
    token = agent.settings.proxy_token
    request.state.listener_token = (token.get_secret_value() or None) if token else None


router = APIRouter(prefix="/pudu", tags=["pudu"], dependencies=[Depends(_bind_token)])


@router.post("/poll", summary="Run one reconciliation now and return its record",
             responses={409: {"description": "No shops to poll (PUDU_SHOP_IDS is empty)"}})
async def poll(agent: PuduAgent, _: ListenerToken) -> dict[str, Any]:
    try:
        return await agent.poller.run_once()
    except ConfigError as exc:  # no shops: nothing was polled, so not a success
        raise ConflictError(str(exc), field="PUDU_SHOP_IDS") from exc


@router.get("/runs", summary="Run records, newest first, a page at a time")
async def runs(agent: PuduAgent, _: ListenerToken,
               limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
               cursor: Annotated[str | None, Query(max_length=1000)] = None) -> dict[str, Any]:
    after = decode_cursor(cursor, Number, Text)
    items, last = await agent.journal.runs(
        limit, None if after is None else (float(after[0]), str(after[1])))
    return Page(items, last).body()
