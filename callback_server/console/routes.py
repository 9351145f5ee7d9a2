"""Routes of the fleet console: the pages, sign-in and sign-out, and the live stream.

The stream starts with a snapshot: ``hello`` (who, and the alert rules' settings the page
judges robots by), ``robots`` (every robot of the key's orgs, in pages of
``SNAPSHOT_PAGE``), ``tracks`` (recent positions by robot, from robot_history, so a reload
keeps the floor view's tracks), ``events`` (the latest, oldest first), ``alerts`` (open and
acknowledged), ``gateways`` and ``ready``; then the hub's frames of changed objects.

``GET /`` is the sign-in page (one password field) or, with a live session cookie, the
console itself; its script and styles are under ``/console/static`` (no build step, no
CDN). The pages are left out of the OpenAPI schema (they are HTML for a browser, not
API); ``/console/session``, ``/console/logout``, ``/console/me`` and ``/console/stream``
are in it, each with its rule in tests/test_access.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from bridge.errors import CapacityError
from bridge.http.api_docs import event_stream
from bridge.http.body import parse_model, read_body
from bridge.http.error_boundary import json_body
from bridge.http.paging import MAX_LIMIT
from bridge.http.sse_encoder import sse_event
from bridge.pudu.command_catalogue import ROBOT_COMMANDS
from callback_server.access import OPERATORS, Principal, Reader, Rules
from callback_server.alerts import CHARGING_STATES, RULES, AlertStore
from callback_server.console.stream import ConsoleStream
from callback_server.ports import AppHost, Host
from callback_server.sessions import COOKIE, public_https

__all__ = ["ASSETS", "router", "rule_settings"]


ASSETS = Path(__file__).resolve().parent / "static"
#: The pages load only this host's files: no inline script, nothing from elsewhere.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
KEEPALIVE_SECONDS = 15.0
#: The latest events a stream starts with.
EVENTS_SNAPSHOT = 100
#: How far back the floor view's tracks start (from robot_history).
TRACK_SECONDS = 30 * 60
#: Robots per ``robots`` event of the snapshot (every robot is sent, a page at a time).
SNAPSHOT_PAGE = MAX_LIMIT


class SessionBody(BaseModel):
    """Body of ``POST /console/session``."""

    key: str = Field(min_length=1, max_length=512)


def _page(name: str) -> HTMLResponse:
    return HTMLResponse((ASSETS / name).read_text(encoding="utf-8"), headers=_HEADERS)


router = APIRouter()


@router.get("/", include_in_schema=False)
async def index(request: Request, access: Rules) -> HTMLResponse:
    signed_in = access.sessions.lookup(request.cookies.get(COOKIE, "")) is not None
    return _page("console.html" if signed_in else "signin.html")


def _secure(request: Request) -> bool:
    """Whether the cookie is marked Secure: the page was reached over public HTTPS."""
    return public_https(request.url.scheme, request.headers.get("origin"))


@router.post("/console/session", summary="Sign in to the console with a key: sets the "
             "console_session cookie (HttpOnly, SameSite=Strict, 12 h)",
             openapi_extra=json_body(SessionBody))
async def sign_in(request: Request, access: Rules) -> JSONResponse:
    # Login CSRF: a browser always sends Origin on a POST; another site's is refused.
    # A client without one (curl) is no browser, and carries no ambient cookie.
    if "origin" in request.headers:
        access.require_same_origin(request, "sign-in")
    body = parse_model(SessionBody, await read_body(request, 4096))
    principal = access.console_principal(body.key.strip())
    sessions = access.sessions
    answer = JSONResponse(_me(principal))
    answer.set_cookie(COOKIE, sessions.create(principal), max_age=int(sessions.seconds),
                      path="/", httponly=True, samesite="strict", secure=_secure(request))
    return answer


@router.post("/console/logout", summary="Sign out: end the session and drop its cookie")
async def sign_out(request: Request, server: Host, access: Rules) -> JSONResponse:
    if COOKIE in request.cookies:
        # A request with the cookie changes state: this host's Origin or 403. A session
        # already gone (expired) is no error: the answer still clears the cookie.
        access.require_same_origin(request, "a request made with the console session")
        access.sessions.drop(request.cookies[COOKIE])
        server.console.end_dead()  # its open streams end now, not at their next frame
    answer = JSONResponse({"status": "success"})
    answer.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                         secure=_secure(request))
    return answer


@router.get("/console/me", summary="Who the console is signed in as")
async def me(principal: Reader) -> dict[str, Any]:
    return _me(principal)


@router.get("/console/stream", summary="Live console updates (Server-Sent Events): "
            "events robots, events, alerts and gateways, each a JSON array of changed "
            "objects, after a snapshot (hello, robots in pages, tracks, events, alerts, "
            "gateways, ready)", response_class=ConsoleStream, status_code=200,
            responses=event_stream("Named events, each `data` one line of JSON"))
async def stream(request: Request, principal: Reader, server: Host,
                 access: Rules) -> Response:
    hub = server.console
    client = hub.join(principal, access.lasting(request, principal))
    if client is None:
        raise CapacityError(f"{hub.max_clients} console streams are open already; "
                            "retry later")
    orgs = None if principal.all_orgs else principal.orgs
    try:  # the first page now: a database error is an HTTP error, not a cut stream
        first = await server.store.list_robots(limit=SNAPSHOT_PAGE, orgs=orgs)
    except BaseException:
        hub.leave(client)
        raise
    return ConsoleStream(client, snapshot(server, principal, first), hub.frame_seconds,
                         KEEPALIVE_SECONDS, on_close=lambda: hub.leave(client))


async def snapshot(server: AppHost, principal: Principal,
                   first: tuple[list[dict[str, Any]], Any]) -> AsyncIterator[bytes]:
    """What a stream starts with: every robot of the key's orgs, a page at a time (50,000
    robots are not one 20 MB JSON array held in memory; ``first`` is the first page and
    its cursor), then the rest of the snapshot."""
    orgs = None if principal.all_orgs else principal.orgs
    yield sse_event("hello", {**_me(principal), "rules": rule_settings(server),
                              "charging_states": sorted(CHARGING_STATES)})
    page, last = first
    yield sse_event("robots", page)
    while last is not None:
        page, last = await server.store.list_robots(limit=SNAPSHOT_PAGE, after=last,
                                                    orgs=orgs)
        yield sse_event("robots", page)
    alerts = await _open_alerts(server.alert_store, orgs)
    events = await server.store.recent_events(limit=EVENTS_SNAPSHOT, orgs=orgs)
    tracks = await server.store.recent_positions(since=time.time() - TRACK_SECONDS,
                                                 orgs=orgs)
    gateways = sorted((g for g in server.gateways.values() if principal.covers(g["org_id"])),
                      key=lambda g: (g["org_id"], g["gateway_id"]))
    yield b"".join((sse_event("tracks", tracks), sse_event("events", events[::-1]),
                    sse_event("alerts", alerts), sse_event("gateways", gateways),
                    sse_event("ready", {"robots": True})))


async def _open_alerts(alerts: AlertStore, orgs: Any) -> list[dict[str, Any]]:
    """Every open, then every acknowledged alert of ``orgs`` (None: all)."""
    found: list[dict[str, Any]] = []
    for state in ("open", "acknowledged"):
        cursor: list[Any] | None = None
        while True:
            page, cursor = await alerts.page(limit=MAX_LIMIT, after=cursor, orgs=orgs,
                                             state=state)
            found += [a.as_dict() for a in page]
            if cursor is None:
                break
    return found


def rule_settings(server: AppHost) -> dict[str, Any]:
    """The alert rules as the page reads them: each rule's title (its id if it has none)
    and settings. The thresholds for stale, stuck, low battery and backlog are these,
    never constants in the script."""
    rules = server.alerts.rules
    return {name: {"title": rules.rule(name).title or name,
                   **rules.rule(name).model_dump(mode="json")} for name in RULES}


def _me(principal: Any) -> dict[str, Any]:
    return {"name": principal.name, "orgs": sorted(principal.orgs), "role": principal.role,
            "operator": principal.role in OPERATORS, "robot_commands": ROBOT_COMMANDS}
