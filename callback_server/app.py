"""The callback server's HTTP app: health, read API, /metrics; IoT Rule ingest
(callback_server.ingest), the Pudu routes, alerts and the console are routers of their own.

Every route is a module-level function; what it needs comes through dependencies: the
server as ``Host`` (callback_server.ports), the caller as ``Reader``/``Operator``/...
and the rules as ``Rules`` (callback_server.access)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from bridge.commands import Command, CommandTimeout
from bridge.errors import (
    CommandTimeoutError,
    NotFoundError,
)
from bridge.http.api_docs import install_docs
from bridge.http.body import parse_model, read_body
from bridge.http.error_boundary import install as install_error_handlers
from bridge.http.error_boundary import json_body
from bridge.http.keyset import page_of
from bridge.http.paging import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MaybeNumber,
    MaybeText,
    Number,
    Page,
    Text,
    decode_cursor,
)
from bridge.http.shortcut import ShortcutApp
from bridge.service.health import (
    HEALTH_RESPONSES,
    HealthQuery,
    health_status,
    unready_body,
)
from bridge.topic import MAX_SN_BYTES
from callback_server.access import Access, Caller, Principal, Reader, Rules
from callback_server.ports import AppHost, Host

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
#: Longest cursor: one of this API's is base64 of a sort key whose longest (an event's:
#: its time, ts and an event_id of 128 characters, up to 12 each as JSON escapes) is
#: under 2,200 characters. A longer one is not ours: 422 naming ``cursor``, not decoded.
MAX_CURSOR_CHARS = 4096
Cursor = Annotated[str | None, Query(max_length=MAX_CURSOR_CHARS)]
#: An org or gateway id: 1-128 characters (ORG_ID, GATEWAY_ID), as wide as its columns.
MAX_ID_CHARS = 128
Org = Annotated[str | None, Query(max_length=MAX_ID_CHARS)]
Gateway = Annotated[str | None, Query(max_length=MAX_ID_CHARS)]
#: A robot state (``status``): its column is 32 characters wide.
Status = Annotated[str | None, Query(max_length=32)]
#: A robot sn: at most MAX_SN_BYTES of UTF-8, so never more characters than that.
Sn = Annotated[str, Path(max_length=MAX_SN_BYTES)]
#: Robot time (epoch seconds) a history starts from.
MaybeSince = Annotated[float | None, Query(ge=0, le=253402300799)]
#: What ``GET /robots/{sn}/history`` returns without ``since``: the console's chart.
HISTORY_DEFAULT_SECONDS = 24 * 3600


#: The routes that take no key (or, Pudu's, their own code).
PUBLIC_PATHS = ("/callback/health", "/api/pudu/webhook", "/api/pudu/webhook/health")


class CommandRequest(BaseModel):
    """Body of ``POST /devices/{device_id}/commands``."""

    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    timeout: CommandTimeout = 10.0
    org_id: str | None = None


#: The health route and the read API.
router = APIRouter()
#: ``/metrics``, included last (after the console) as it always was.
scrape = APIRouter()


def create_app(server: AppHost) -> FastAPI:
    """Build the app around a running server: its routers, and the server and its access
    rules in ``app.state`` for the routes' dependencies."""
    from fastapi.staticfiles import StaticFiles

    from callback_server.alerts.routes import router as alert_router
    from callback_server.console.routes import ASSETS
    from callback_server.console.routes import router as console_router
    from callback_server.ingest import ingest_now
    from callback_server.ingest import router as ingest_router
    from callback_server.pudu_routes import router as pudu_router
    from callback_server.pudu_webhook import install as install_pudu_webhook

    app = ShortcutApp(title="Pudu fleet callback server", version=server.version,
                      docs_url=None, redoc_url=None)
    install_docs(app)
    # every route but these takes a key, and reads the database or the broker
    install_error_handlers(app, common=(401, 403, 503), public=PUBLIC_PATHS)
    app.state.host = server
    app.state.access = server.access
    app.include_router(ingest_router)
    app.shortcut("POST", "/callback/messages", ingest_now)  # AWS IoT Rules' busiest route
    install_pudu_webhook(app, server)
    app.include_router(router)
    app.include_router(pudu_router)
    app.include_router(alert_router)
    app.mount("/console/static", StaticFiles(directory=ASSETS), name="console-assets")
    app.include_router(console_router)
    app.include_router(scrape)
    return app


#: Health fields any caller sees; the figures (and the database's error) need a key.
_PUBLIC_HEALTH = ("status", "reasons", "timestamp", "service", "version", "ready",
                  "not_ready", "broker_connected", "database_ok", "subscribed")


@router.get("/callback/health", summary="Broker and database state",
            description="200 with `status` healthy|degraded while serving; without a key "
            "only the state and its reasons, with one (Bearer, any role) every figure. "
            "`?ready=1`: 503 until the server can take traffic (listeners bound, database "
            "reachable) and while it stops; a broker outage never fails it. `?strict=1`: "
            "also 503 while degraded (for `curl -f` monitors).",
            responses=HEALTH_RESPONSES)
async def health(request: Request, server: Host, access: Rules) -> JSONResponse:
    query = HealthQuery(request.query_params)
    # Open to every caller (probes send no key); the figures only to a known key.
    detailed = access.bearer_principal(request) is not None
    if server.readiness.waiting_for("store"):  # not entered: nothing to ask yet
        body = unready_body("callback-server", server.readiness.reasons())
    else:
        body = await server.health()
        if not detailed:  # never the database's host, port or name (its error has them)
            body = {k: body[k] for k in _PUBLIC_HEALTH if k in body}
    not_ready = body.get("not_ready") or []
    return JSONResponse(body, status_code=health_status(body, query, not_ready))


async def visible_robot(server: AppHost, access: Access, principal: Principal,
                        sn: str) -> dict[str, Any]:
    """Robot ``sn`` if the caller's orgs hold it; 404 otherwise (another org's too)."""
    row = await server.store.get_robot(sn, None if principal.all_orgs else principal.orgs)
    if row is None and not principal.all_orgs:
        row = await server.store.get_robot(sn)  # another org's: refused (and counted)
    if row is None:
        raise NotFoundError(f"robot {sn} not found")
    access.require_org(principal, row.get("org_id"), f"robot {sn} not found")
    return row


@router.get("/robots", summary="Latest state of robots, a page at a time, by sn")
async def robots(
    principal: Reader, server: Host, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None,
    org: Org = None, gateway: Gateway = None, status: Status = None,
) -> dict[str, Any]:
    after = decode_cursor(cursor, Text, Text)  # (sn, org): two orgs may share an sn
    items, last = await server.store.list_robots(
        limit=limit, after=after,
        orgs=None if principal.all_orgs else principal.orgs,
        org=org, gateway=gateway, status=status)
    return Page(items, last).body()


@router.get("/robots/{sn}", summary="Latest state of one robot")
async def robot(sn: Sn, principal: Reader, server: Host, access: Rules) -> JSONResponse:
    return JSONResponse(await visible_robot(server, access, principal, sn))


@router.get("/robots/{sn}/events", summary="A robot's events, newest first, a page at a time")
async def events(sn: Sn, principal: Reader, server: Host, access: Rules,
                 limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> dict[str, Any]:
    org = (await visible_robot(server, access, principal, sn))["org_id"]
    after = decode_cursor(cursor, MaybeText, MaybeNumber, Text)
    items, last = await server.store.list_events(sn, limit=limit, after=after, org=org)
    return Page(items, last).body()


@router.get("/robots/{sn}/history",
            summary="A robot's state over time, oldest first, downsampled: every status or "
                    "charge change and at most a point a minute (default: the last 24 h)")
async def history(sn: Sn, principal: Reader, server: Host, access: Rules,
                  since: MaybeSince = None, limit: Limit = MAX_LIMIT,
                  cursor: Cursor = None) -> dict[str, Any]:
    org = (await visible_robot(server, access, principal, sn))["org_id"]
    start = time.time() - HISTORY_DEFAULT_SECONDS if since is None else since
    after = decode_cursor(cursor, Number)
    items, last = await server.store.list_history(
        sn, since=start, limit=limit, after=None if after is None else float(after[0]),
        org=org)
    return Page(items, last).body()


@router.get("/robots/{sn}/tasks", summary="A robot's latest tasks (each at its newest "
                                           "state), the one started last first")
async def tasks(sn: Sn, principal: Reader, server: Host, access: Rules,
                limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    org = (await visible_robot(server, access, principal, sn))["org_id"]
    return Page(await server.store.list_tasks(sn, limit=limit, org=org)).body()


@router.post("/devices/{device_id}/commands",
             summary="Send a command to a gateway and wait for its response",
             responses={504: {"description": "The gateway did not answer within the timeout"}},
             openapi_extra=json_body(CommandRequest))
async def send_command(device_id: str, request: Request, principal: Reader, server: Host,
                       access: Rules) -> JSONResponse:
    body = parse_model(CommandRequest, await read_body(request, 64 * 1024))
    org = body.org_id or server.org_of(device_id, principal)
    access.require_org(principal, org, f"gateway {device_id} not found")
    access.require_operator(principal, "send commands")
    wait = min(body.timeout, server.settings.command_timeout_max)
    outcome = await server.commands.send(org, device_id, Command(body.command, body.args),
                                         wait)
    await server.record_command(outcome, principal.name)
    if outcome.response is None:
        raise CommandTimeoutError(device_id, wait, outcome.command.message_id)
    return JSONResponse(outcome.answer())


@router.get("/gateways", summary="Each gateway's presence (retained online / last-will offline)")
async def gateways(principal: Reader, server: Host, limit: Limit = DEFAULT_LIMIT,
                   cursor: Cursor = None) -> dict[str, Any]:
    mine = (g for g in server.gateways.values() if principal.covers(g["org_id"]))
    return page_of(mine, lambda g: [g["org_id"], g["gateway_id"]],
                   decode_cursor(cursor, Text, Text), limit).body()


@scrape.get("/metrics", summary="Prometheus metrics (keys whose orgs are [\"*\"])",
            response_class=PlainTextResponse)
async def metrics(principal: Caller, server: Host, access: Rules) -> Response:
    access.require_all_orgs(principal, "/metrics")
    server.refresh_gauges()
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)
