"""Routes for alerts and alert subscriptions (app.py includes the router).

Access is the app's: alerts are read by viewers of their org, acknowledged and silenced
by operators; subscriptions and their delivery logs are operators'. An alert or
subscription of an org the key does not cover answers 404, as if it did not exist.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, field_validator

from bridge.errors import ConflictError, InputError, NotFoundError
from bridge.http.body import parse_model, read_body
from bridge.http.error_boundary import json_body
from bridge.http.paging import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Number,
    Page,
    Text,
    decode_cursor,
)
from callback_server.access import Access, Operator, Principal, Reader, Rules
from callback_server.alerts.alert import STATES, Alert
from callback_server.alerts.alert_subscriptions import AlertSubscription, AlertSubscriptions
from callback_server.alerts.rules import RULES
from callback_server.alerts.store import AlertStore
from callback_server.ports import Host

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


router = APIRouter()


async def visible_alert(alerts: AlertStore, access: Access, principal: Principal,
                        alert_id: str) -> Alert:
    """The alert, if the caller's orgs cover it; 404 otherwise, as if it did not exist."""
    alert = await alerts.get(alert_id)
    if alert is None:
        raise NotFoundError(f"alert {alert_id} not found")
    access.require_org(principal, alert.org, f"alert {alert_id} not found")
    return alert


async def visible_subscription(subs: AlertSubscriptions, principal: Principal,
                               sub_id: str) -> AlertSubscription:
    """The subscription, if the caller's orgs cover all of its orgs; 404 otherwise."""
    sub = await subs.subscription(sub_id)
    if sub is None or not principal.covers_all(sub.orgs):
        raise NotFoundError(f"alert subscription {sub_id} not found")
    return sub


async def _current(alerts: AlertStore, alert_id: str) -> dict[str, Any]:
    now = await alerts.get(alert_id)
    assert now is not None
    return now.as_dict()


def _check_filters(state: str | None, rule: str | None) -> None:
    if state is not None and state not in STATES:
        raise InputError(f"state must be one of {', '.join(STATES)}", field="state")
    if rule is not None and rule not in RULES:
        raise InputError(f"rule must be one of {', '.join(RULES)}", field="rule")


@router.get("/alerts", summary="Alerts, newest first, a page at a time")
async def list_alerts(
    principal: Reader, server: Host,
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
    cursor: str | None = Query(None, max_length=1000),
    state: str | None = Query(None, max_length=16),
    org: str | None = Query(None, max_length=128),
    rule: str | None = Query(None, max_length=32),
) -> dict[str, Any]:
    _check_filters(state, rule)
    after = decode_cursor(cursor, Number, Text)
    items, last = await server.alert_store.page(
        limit=limit, after=after, orgs=None if principal.all_orgs else principal.orgs,
        org=org, state=state, rule=rule)
    return Page(items, last).body(Alert.as_dict)


@router.get("/alerts/{alert_id}", summary="One alert")
async def get_alert(alert_id: str, principal: Reader, server: Host,
                    access: Rules) -> dict[str, Any]:
    return (await visible_alert(server.alert_store, access, principal, alert_id)).as_dict()


@router.post("/alerts/{alert_id}/ack", summary="Acknowledge an open alert",
             responses={409: {"description": "The alert is resolved"}},
             openapi_extra=json_body(AckBody))
async def ack(alert_id: str, request: Request, principal: Reader, server: Host,
              access: Rules) -> dict[str, Any]:
    alerts = server.alert_store
    alert = await visible_alert(alerts, access, principal, alert_id)
    access.require_operator(principal, "acknowledge alerts")
    body = parse_model(AckBody, await read_body(request, BODY_LIMIT))
    if alert.state == "resolved":
        raise ConflictError(f"alert {alert_id} is resolved")
    transition = await alerts.acknowledge(alert_id, principal.name, body.comment, time.time())
    if transition is not None:
        server.alert_delivery.submit(transition)
    return await _current(alerts, alert_id)


@router.post("/alerts/{alert_id}/silence",
             summary="Silence this alert's rule for its subject for some minutes",
             openapi_extra=json_body(SilenceBody))
async def silence(alert_id: str, request: Request, principal: Reader, server: Host,
                  access: Rules) -> dict[str, Any]:
    alerts = server.alert_store
    alert = await visible_alert(alerts, access, principal, alert_id)
    access.require_operator(principal, "silence alerts")
    body = parse_model(SilenceBody, await read_body(request, BODY_LIMIT))
    await alerts.silence(alert, time.time() + body.minutes * 60, principal.name)
    return await _current(alerts, alert_id)


@router.post("/alert-subscriptions",
             summary="Send every alert transition (of some rules, orgs) to a webhook",
             openapi_extra=json_body(SubscriptionBody))
async def subscribe(request: Request, principal: Operator, server: Host,
                    access: Rules) -> dict[str, Any]:
    body = parse_model(SubscriptionBody, await read_body(request, BODY_LIMIT))
    orgs = access.receiver_orgs(principal, body.orgs)
    await server.outbound.check_url(body.url, field="url")
    sub = await server.alert_subscriptions.add_subscription(
        body.url, body.rules, orgs, principal.name, time.time(), secret=body.secret)
    # The only time the secret is shown: the receiver needs it to verify.
    return {**sub.public(), "secret": sub.secret,
            "signature": "X-Signature: sha256=<hex HMAC-SHA256(secret, body)>"}


@router.get("/alert-subscriptions", summary="Alert subscriptions (never their secrets)")
async def subscriptions(principal: Operator, server: Host,
                        limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                        cursor: str | None = Query(None, max_length=1000),
                        ) -> dict[str, Any]:
    after = decode_cursor(cursor, Text)
    mine = [s for s in await server.alert_subscriptions.subscriptions(
        None if after is None else str(after[0])) if principal.covers_all(s.orgs)]
    return Page.of(mine, limit, lambda s: [s.id]).body(lambda s: s.public())


@router.delete("/alert-subscriptions/{sub_id}", summary="Stop an alert subscription")
async def unsubscribe(sub_id: str, principal: Operator, server: Host) -> dict[str, Any]:
    sub = await visible_subscription(server.alert_subscriptions, principal, sub_id)
    await server.alert_subscriptions.delete_subscription(sub.id)
    return {"status": "success", "id": sub.id, "timestamp": int(time.time())}


@router.get("/alert-subscriptions/{sub_id}/deliveries",
            summary="The delivery log of a subscription: each attempt, newest first")
async def deliveries(sub_id: str, principal: Operator, server: Host,
                     limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                     cursor: str | None = Query(None, max_length=1000),
                     ) -> dict[str, Any]:
    sub = await visible_subscription(server.alert_subscriptions, principal, sub_id)
    after = decode_cursor(cursor, (int,))
    items, last = await server.alert_subscriptions.deliveries(
        sub.id, limit=limit, after=None if after is None else int(after[0]))
    return Page(items, last).body()
