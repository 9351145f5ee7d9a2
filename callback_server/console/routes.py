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
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from bridge.docs import event_stream
from bridge.errors import CapacityError
from bridge.http_body import parse_model, read_body
from bridge.paging import MAX_LIMIT
from callback_server.access import OPERATORS, READERS, Access
from callback_server.alerts import CHARGING_STATES, RULES, AlertEngine, AlertStore
from callback_server.console.hub import ConsoleHub
from callback_server.console.stream import ConsoleStream, sse
from callback_server.sessions import COOKIE, public_https
from callback_server.store import Store

__all__ = ["ASSETS", "ConsoleHost", "create_console_router"]


class ConsoleHost(Protocol):
    """What the console's routes read of the server (``callback_server.ports.AppHost`` has
    it all; named here so the console and the ports module do not import each other)."""

    store: Store
    alert_store: AlertStore
    alerts: AlertEngine
    gateways: dict[str, dict[str, Any]]

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


def create_console_router(server: ConsoleHost, access: Access, hub: ConsoleHub) -> APIRouter:
    router = APIRouter()
    sessions = access.sessions

    @router.get("/", include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        signed_in = sessions.lookup(request.cookies.get(COOKIE, "")) is not None
        return _page("console.html" if signed_in else "signin.html")

    @router.post("/console/session", summary="Sign in to the console with a key: sets the "
                 "console_session cookie (HttpOnly, SameSite=Strict, 12 h)",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": SessionBody.model_json_schema()}}}})
    async def sign_in(request: Request) -> JSONResponse:
        # Login CSRF: a browser always sends Origin on a POST; another site's is refused.
        # A client without one (curl) is no browser, and carries no ambient cookie.
        if "origin" in request.headers:
            access.require_same_origin(request, "sign-in")
        body = parse_model(SessionBody, await read_body(request, 4096))
        principal = access.from_key(body.key.strip())
        access.require_role(principal, READERS, "use the console")
        session_id = sessions.create(principal)
        answer = JSONResponse(_me(principal))
        answer.set_cookie(COOKIE, session_id, max_age=int(sessions.seconds), path="/",
                          httponly=True, samesite="strict",
                          secure=public_https(request.url.scheme,
                                              request.headers.get("origin")))
        return answer

    @router.post("/console/logout", summary="Sign out: end the session and drop its cookie")
    async def sign_out(request: Request) -> JSONResponse:
        if COOKIE in request.cookies:
            # A request with the cookie changes state: this host's Origin or 403. A session
            # already gone (expired) is no error: the answer still clears the cookie.
            access.require_same_origin(request, "a request made with the console session")
            sessions.drop(request.cookies[COOKIE])
            hub.end_dead()  # its open streams end now, not at their next frame
        answer = JSONResponse({"status": "success"})
        answer.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                             secure=public_https(request.url.scheme,
                                                 request.headers.get("origin")))
        return answer

    @router.get("/console/me", summary="Who the console is signed in as")
    async def me(request: Request) -> dict[str, Any]:
        principal = access.principal(request)
        access.require_role(principal, READERS, "use the console")
        return _me(principal)

    @router.get("/console/stream", summary="Live console updates (Server-Sent Events): "
                "events robots, events, alerts and gateways, each a JSON array of changed "
                "objects, after a snapshot (hello, robots in pages, tracks, events, alerts, "
                "gateways, ready)", response_class=ConsoleStream, status_code=200,
                responses=event_stream("Named events, each `data` one line of JSON"))
    async def stream(request: Request) -> Response:
        principal = access.principal(request)
        access.require_role(principal, READERS, "use the console")
        client = hub.join(principal, access.lasting(request, principal))
        if client is None:
            raise CapacityError(f"{hub.max_clients} console streams are open already; "
                                "retry later")
        orgs = None if principal.all_orgs else principal.orgs
        try:  # the first page now: a database error is an HTTP error, not a cut stream
            first, after = await server.store.list_robots(limit=SNAPSHOT_PAGE, orgs=orgs)
        except BaseException:
            hub.leave(client)
            raise

        async def snapshot() -> AsyncIterator[bytes]:
            """Every robot of the key's orgs, a page at a time (50,000 robots are not one
            20 MB JSON array held in memory), then the rest of the snapshot."""
            yield sse("hello", {**_me(principal), "rules": rule_settings(server),
                                "charging_states": sorted(CHARGING_STATES)})
            yield sse("robots", first)
            last = after
            while last is not None:
                page, last = await server.store.list_robots(
                    limit=SNAPSHOT_PAGE, after=last, orgs=orgs)
                yield sse("robots", page)
            alerts: list[dict[str, Any]] = []
            for state in ("open", "acknowledged"):
                cursor: list[Any] | None = None
                while True:
                    page_, cursor = await server.alert_store.page(
                        limit=MAX_LIMIT, after=cursor, orgs=orgs, state=state)
                    alerts += [a.as_dict() for a in page_]
                    if cursor is None:
                        break
            events = await server.store.recent_events(limit=EVENTS_SNAPSHOT, orgs=orgs)
            tracks = await server.store.recent_positions(
                since=time.time() - TRACK_SECONDS, orgs=orgs)
            gateways = sorted((g for g in server.gateways.values()
                               if principal.covers(g["org_id"])),
                              key=lambda g: (g["org_id"], g["gateway_id"]))
            yield b"".join((sse("tracks", tracks), sse("events", events[::-1]),
                            sse("alerts", alerts), sse("gateways", gateways),
                            sse("ready", {"robots": True})))

        return ConsoleStream(client, snapshot(), hub.frame_seconds, KEEPALIVE_SECONDS,
                             on_close=lambda: hub.leave(client))

    return router


def rule_settings(server: ConsoleHost) -> dict[str, Any]:
    """The alert rules as the page reads them: each rule's title (its id if it has none)
    and settings. The thresholds for stale, stuck, low battery and backlog are these,
    never constants in the script."""
    rules = server.alerts.rules
    return {name: {"title": rules.rule(name).title or name,
                   **rules.rule(name).model_dump(mode="json")} for name in RULES}


def _me(principal: Any) -> dict[str, Any]:
    return {"name": principal.name, "orgs": sorted(principal.orgs), "role": principal.role,
            "operator": principal.role in OPERATORS}
