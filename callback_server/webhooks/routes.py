"""``/webhooks`` (and ``/api/v1/webhooks``, the path receivers were built against): one
module-level router, included twice by the service.

Operators (and admins) manage webhooks of the orgs their key covers; a webhook of an
org the key does not cover answers 404, as if it did not exist.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, field_validator

from bridge.errors import NotFoundError
from bridge.http.body import parse_model, read_body
from bridge.http.error_boundary import json_body
from bridge.http.paging import DEFAULT_LIMIT, MAX_LIMIT, Page, Text, decode_cursor
from callback_server.access import Operator, Principal, Rules
from callback_server.webhooks.events import EVENTS
from callback_server.webhooks.service import Webhooks
from callback_server.webhooks.store import Webhook

BODY_LIMIT = 16 * 1024
SIGNATURE = "X-Signature: sha256=<hex HMAC-SHA256(secret, body)>"

router = APIRouter(tags=["webhooks"])


class WebhookBody(BaseModel):
    """Body of ``POST /webhooks``."""

    url: str = Field(min_length=1, max_length=2048)
    events: list[str] = Field(min_length=1, max_length=len(EVENTS))
    orgs: list[str] | None = Field(default=None, min_length=1, max_length=100)
    secret: str | None = Field(default=None, min_length=16, max_length=256)

    @field_validator("events")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(EVENTS))
        if unknown:
            raise ValueError(f"unknown events {unknown}; known: {', '.join(EVENTS)}")
        return list(dict.fromkeys(v))


async def _webhooks(request: Request) -> Webhooks:
    """The server's webhooks (``app.state.webhooks``, set by the service)."""
    return cast(Webhooks, request.app.state.webhooks)


Hooks = Annotated[Webhooks, Depends(_webhooks)]


async def _visible(hooks: Webhooks, principal: Principal, hook_id: str) -> Webhook:
    hook = await hooks.store.get(hook_id)
    if hook is None or not principal.covers_all(hook.orgs):
        raise NotFoundError(f"webhook {hook_id} not found")
    return hook


@router.post("/webhooks", summary="Send events of some types (of some orgs) to a URL",
             openapi_extra=json_body(WebhookBody))
async def create_webhook(request: Request, principal: Operator, hooks: Hooks,
                         access: Rules) -> dict[str, Any]:
    body = parse_model(WebhookBody, await read_body(request, BODY_LIMIT))
    orgs = access.receiver_orgs(principal, body.orgs)
    await hooks.outbound.check_url(body.url, field="url")
    hook = await hooks.store.add(body.url, body.events, orgs, principal.name, time.time(),
                                 secret=body.secret)
    hooks.delivery.changed()
    # The only time the secret is shown: the receiver needs it to verify.
    return {**hook.public(), "secret": hook.secret, "signature": SIGNATURE}


@router.get("/webhooks", summary="Webhooks the key may manage (never their secrets)")
async def list_webhooks(principal: Operator, hooks: Hooks,
                        limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                        cursor: str | None = Query(None, max_length=1000)) -> dict[str, Any]:
    after = decode_cursor(cursor, Text)
    mine = [h for h in await hooks.store.all(None if after is None else str(after[0]))
            if principal.covers_all(h.orgs)]
    return Page.of(mine, limit, lambda h: [h.id]).body(lambda h: h.public())


@router.delete("/webhooks/{hook_id}", summary="Stop a webhook")
async def delete_webhook(hook_id: str, principal: Operator, hooks: Hooks) -> dict[str, Any]:
    hook = await _visible(hooks, principal, hook_id)
    await hooks.store.delete(hook.id)
    hooks.delivery.changed()
    return {"status": "success", "id": hook.id, "timestamp": int(time.time())}


@router.get("/webhooks/{hook_id}/deliveries",
            summary="A webhook's delivery log: each attempt, newest first")
async def webhook_deliveries(hook_id: str, principal: Operator, hooks: Hooks,
                             limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                             cursor: str | None = Query(None, max_length=1000),
                             ) -> dict[str, Any]:
    hook = await _visible(hooks, principal, hook_id)
    after = decode_cursor(cursor, (int,))
    items, last = await hooks.store.deliveries(
        hook.id, limit=limit, after=None if after is None else int(after[0]))
    return Page(items, last).body(lambda item: {k: v for k, v in item.items() if k != "ref"})
