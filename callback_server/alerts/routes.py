"""Routes for alerts and alert subscriptions (app.py includes the router).

Access is the app's: alerts are read by viewers of their org, acknowledged and silenced
by operators; subscriptions and their delivery logs are operators'. An alert or
subscription of an org the key does not cover answers 404, as if it did not exist.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, field_validator

from bridge.errors import ConflictError, ForbiddenError, InputError, NotFoundError
from bridge.http_body import parse_model, read_body
from bridge.paging import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Number,
    Page,
    Text,
    decode_cursor,
)
from callback_server.access import OPERATORS, READERS, Access, Principal
from callback_server.alerts.alert import STATES, Alert
from callback_server.alerts.rules import RULES
from callback_server.alerts.store import AlertSubscription
from callback_server.keys import ALL_ORGS

if TYPE_CHECKING:
    from callback_server.ports import AppHost

BODY_LIMIT = 16 * 1024


class AckBody(BaseModel):
    """Body of ``POST /alerts/{id}/ack``."""

    comment: str | None = Field(default=None, max_length=2000)


class SilenceBody(BaseModel):
    """Body of ``POST /alerts/{id}/silence``: this rule for this subject, for a while."""

    minutes: float = Field(gt=0, le=30 * 24 * 60)


class SubscriptionBody(BaseModel):
    """Body of ``POST /alert-subscriptions``."""

    url: str = Field(min_length=1, max_length=2048)
    rules: list[str] | None = Field(default=None, max_length=len(RULES))
    orgs: list[str] | None = Field(default=None, min_length=1, max_length=100)
    secret: str | None = Field(default=None, min_length=16, max_length=256)

    @field_validator("rules")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        unknown = sorted(set(v or ()) - set(RULES))
        if unknown:
            raise ValueError(f"unknown rules {unknown}; known: {', '.join(RULES)}")
        return v


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def _covers_all(principal: Principal, orgs: tuple[str, ...]) -> bool:
    if principal.all_orgs:
        return True
    return ALL_ORGS not in orgs and all(principal.covers(o) for o in orgs)


def create_alert_router(server: AppHost, access: Access) -> APIRouter:
    router = APIRouter()
    alerts = server.alert_store

    def reader(request: Request) -> Principal:
        principal = access.principal(request)
        access.require_role(principal, READERS, "read alerts")
        return principal

    def operator(request: Request) -> Principal:
        principal = access.principal(request)
        access.require_role(principal, OPERATORS, "manage alert subscriptions")
        return principal

    async def visible_alert(principal: Principal, alert_id: str) -> Alert:
        alert = await alerts.get(alert_id)
        if alert is None:
            raise NotFoundError(f"alert {alert_id} not found")
        access.require_org(principal, alert.org, f"alert {alert_id} not found")
        return alert

    async def visible_subscription(principal: Principal, sub_id: str) -> AlertSubscription:
        sub = await alerts.subscription(sub_id)
        if sub is None or not _covers_all(principal, sub.orgs):
            raise NotFoundError(f"alert subscription {sub_id} not found")
        return sub

    @router.get("/alerts", summary="Alerts, newest first, a page at a time")
    async def list_alerts(
        request: Request, limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        cursor: str | None = Query(None, max_length=1000),
        state: str | None = Query(None, max_length=16),
        org: str | None = Query(None, max_length=128),
        rule: str | None = Query(None, max_length=32),
    ) -> dict[str, Any]:
        principal = reader(request)
        if state is not None and state not in STATES:
            raise InputError(f"state must be one of {', '.join(STATES)}", field="state")
        if rule is not None and rule not in RULES:
            raise InputError(f"rule must be one of {', '.join(RULES)}", field="rule")
        after = decode_cursor(cursor, Number, Text)
        items, last = await alerts.page(
            limit=limit, after=after, orgs=None if principal.all_orgs else principal.orgs,
            org=org, state=state, rule=rule)
        return Page(items, last).body(Alert.as_dict)

    @router.get("/alerts/{alert_id}", summary="One alert")
    async def get_alert(alert_id: str, request: Request) -> dict[str, Any]:
        return (await visible_alert(reader(request), alert_id)).as_dict()

    @router.post("/alerts/{alert_id}/ack", summary="Acknowledge an open alert",
                 responses={409: {"description": "The alert is resolved"}},
                 openapi_extra=_schema(AckBody))
    async def ack(alert_id: str, request: Request) -> dict[str, Any]:
        principal = reader(request)
        alert = await visible_alert(principal, alert_id)
        access.require_role(principal, OPERATORS, "acknowledge alerts")
        body = parse_model(AckBody, await read_body(request, BODY_LIMIT))
        if alert.state == "resolved":
            raise ConflictError(f"alert {alert_id} is resolved")
        transition = await alerts.acknowledge(alert_id, principal.name, body.comment,
                                              time.time())
        if transition is not None:
            server.alert_delivery.submit(transition)
        now = await alerts.get(alert_id)
        assert now is not None
        return now.as_dict()

    @router.post("/alerts/{alert_id}/silence",
                 summary="Silence this alert's rule for its subject for some minutes",
                 openapi_extra=_schema(SilenceBody))
    async def silence(alert_id: str, request: Request) -> dict[str, Any]:
        principal = reader(request)
        alert = await visible_alert(principal, alert_id)
        access.require_role(principal, OPERATORS, "silence alerts")
        body = parse_model(SilenceBody, await read_body(request, BODY_LIMIT))
        await alerts.silence(alert, time.time() + body.minutes * 60, principal.name)
        now = await alerts.get(alert_id)
        assert now is not None
        return now.as_dict()

    @router.post("/alert-subscriptions",
                 summary="Send every alert transition (of some rules, orgs) to a webhook",
                 openapi_extra=_schema(SubscriptionBody))
    async def subscribe(request: Request) -> dict[str, Any]:
        principal = operator(request)
        body = parse_model(SubscriptionBody, await read_body(request, BODY_LIMIT))
        orgs = tuple(body.orgs) if body.orgs else (
            (ALL_ORGS,) if principal.all_orgs else tuple(sorted(principal.orgs)))
        if not _covers_all(principal, orgs):
            access.refuse_foreign(principal, [o for o in orgs if o != ALL_ORGS] or ["*"])
            raise ForbiddenError(f"key {principal.name!r} does not cover every org")
        await server.outbound.check_url(body.url, field="url")
        sub = await alerts.add_subscription(body.url, body.rules, orgs, principal.name,
                                            time.time(), secret=body.secret)
        # The only time the secret is shown: the receiver needs it to verify.
        return {**sub.public(), "secret": sub.secret,
                "signature": "X-Signature: sha256=<hex HMAC-SHA256(secret, body)>"}

    @router.get("/alert-subscriptions", summary="Alert subscriptions (never their secrets)")
    async def subscriptions(request: Request,
                            limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                            cursor: str | None = Query(None, max_length=1000),
                            ) -> dict[str, Any]:
        principal = operator(request)
        after = decode_cursor(cursor, Text)
        mine = [s for s in await alerts.subscriptions(None if after is None else str(after[0]))
                if _covers_all(principal, s.orgs)]
        return Page.of(mine, limit, lambda s: [s.id]).body(lambda s: s.public())

    @router.delete("/alert-subscriptions/{sub_id}", summary="Stop an alert subscription")
    async def unsubscribe(sub_id: str, request: Request) -> dict[str, Any]:
        sub = await visible_subscription(operator(request), sub_id)
        await alerts.delete_subscription(sub.id)
        return {"status": "success", "id": sub.id, "timestamp": int(time.time())}

    @router.get("/alert-subscriptions/{sub_id}/deliveries",
                summary="The delivery log of a subscription: each attempt, newest first")
    async def deliveries(sub_id: str, request: Request,
                         limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                         cursor: str | None = Query(None, max_length=1000),
                         ) -> dict[str, Any]:
        sub = await visible_subscription(operator(request), sub_id)
        after = decode_cursor(cursor, (int,))
        items, last = await alerts.deliveries(
            sub.id, limit=limit, after=None if after is None else int(after[0]))
        return Page(items, last).body()

    return router
