"""The callback server's HTTP app: health, read API, /metrics; IoT Rule ingest
(callback_server.ingest) and the Pudu routes are routers of their own."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from bridge.commands import Command, CommandTimeout
from bridge.docs import install_docs
from bridge.errors import (
    CommandTimeoutError,
    NotFoundError,
)
from bridge.health import HealthQuery, health_status, unready_body
from bridge.http_body import parse_model, read_body
from bridge.http_errors import install as install_error_handlers
from bridge.paging import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MaybeNumber,
    MaybeText,
    Number,
    Text,
    decode_cursor,
    encode_cursor,
    page,
)
from callback_server.access import OPERATORS, READERS, Access, Principal
from callback_server.ports import AppHost


def _reader(request: Request) -> Principal:
    """The caller, if it may use the read API (401/403 otherwise)."""
    access: Access = request.app.state.access
    principal = access.principal(request)
    access.require_role(principal, READERS, "use the read API")
    return principal


Reader = Annotated[Principal, Depends(_reader)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
#: Robot time (epoch seconds) a history starts from.
MaybeSince = Annotated[float | None, Query(ge=0, le=253402300799)]
#: The routes that take no key (or, Pudu's, their own code).
PUBLIC_PATHS = ("/callback/health", "/api/pudu/webhook", "/api/pudu/webhook/health")
#: What ``GET /robots/{sn}/history`` returns without ``since``: the console's chart.
HISTORY_DEFAULT_SECONDS = 24 * 3600


class CommandRequest(BaseModel):
    """Body of ``POST /devices/{device_id}/commands``."""

    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    timeout: CommandTimeout = 10.0
    org_id: str | None = None


def create_app(server: AppHost) -> FastAPI:
    """Build the app around a running server."""
    app = FastAPI(title="Pudu fleet callback server", version=server.version,
                  docs_url=None, redoc_url=None)
    install_docs(app)

    # every route but these takes a key, and reads the database or the broker
    install_error_handlers(app, common=(401, 403, 503), public=PUBLIC_PATHS)

    access = server.access
    app.state.access = access

    from callback_server.ingest import create_ingest_router
    from callback_server.pudu_webhook import create_pudu_webhook_router

    app.include_router(create_ingest_router(server, access))
    app.include_router(create_pudu_webhook_router(server))

    @app.get("/callback/health", summary="Broker and database state",
             description="200 with `status` healthy|degraded while serving; without a key "
             "only the state and its reasons, with one (Bearer, any role) every figure. "
             "`?ready=1`: 503 until the server can take traffic (listeners bound, database "
             "reachable) and while it stops; a broker outage never fails it. `?strict=1`: "
             "also 503 while degraded (for `curl -f` monitors).",
             responses={503: {"description": "Not ready (`?ready=1`), or degraded "
                                              "(`?strict=1`)"}})
    async def health(request: Request) -> JSONResponse:
        public = ("status", "reasons", "timestamp", "service", "version", "ready",
                  "not_ready", "broker_connected", "database_ok", "subscribed")
        query = HealthQuery(request.query_params)
        # Open to every caller (probes send no key); the figures only to a known key.
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        detailed = scheme.lower() == "bearer" and access.keys.lookup(key.strip()) is not None
        if server.readiness.waiting_for("store"):  # not entered: nothing to ask yet
            body = unready_body("callback-server", server.readiness.reasons())
        else:
            body = await server.health()
            if not detailed:  # never the database's host, port or name (its error has them)
                body = {k: body[k] for k in public if k in body}
        not_ready = body.get("not_ready") or []
        return JSONResponse(body, status_code=health_status(body, query, not_ready))

    async def visible_robot(principal: Principal, sn: str) -> dict[str, Any]:
        row = await server.store.get_robot(sn, None if principal.all_orgs else principal.orgs)
        if row is None and not principal.all_orgs:
            row = await server.store.get_robot(sn)  # another org's: refused (and counted)
        if row is None:
            raise NotFoundError(f"robot {sn} not found")
        access.require_org(principal, row.get("org_id"), f"robot {sn} not found")
        return row

    @app.get("/robots", summary="Latest state of robots, a page at a time, by sn")
    async def robots(
        principal: Reader, limit: Limit = DEFAULT_LIMIT, cursor: str | None = None,
        org: str | None = None, gateway: str | None = None, status: str | None = None,
    ) -> dict[str, Any]:
        after = decode_cursor(cursor, Text, Text)  # (sn, org): two orgs may share an sn
        items, last = await server.store.list_robots(
            limit=limit, after=after,
            orgs=None if principal.all_orgs else principal.orgs,
            org=org, gateway=gateway, status=status)
        return {"items": items, "next_cursor": None if last is None else encode_cursor(last)}

    @app.get("/robots/{sn}", summary="Latest state of one robot")
    async def robot(sn: str, principal: Reader) -> JSONResponse:
        return JSONResponse(await visible_robot(principal, sn))

    @app.get("/robots/{sn}/events", summary="A robot's events, newest first, a page at a time")
    async def events(sn: str, principal: Reader, limit: Limit = DEFAULT_LIMIT,
                     cursor: str | None = None) -> dict[str, Any]:
        org = (await visible_robot(principal, sn))["org_id"]
        after = decode_cursor(cursor, MaybeText, MaybeNumber, Text)
        items, last = await server.store.list_events(sn, limit=limit, after=after, org=org)
        return {"items": items, "next_cursor": None if last is None else encode_cursor(last)}

    @app.get("/robots/{sn}/history",
             summary="A robot's state over time, oldest first, downsampled: every status or "
                     "charge change and at most a point a minute (default: the last 24 h)")
    async def history(sn: str, principal: Reader, since: MaybeSince = None,
                      limit: Limit = MAX_LIMIT, cursor: str | None = None) -> dict[str, Any]:
        org = (await visible_robot(principal, sn))["org_id"]
        start = time.time() - HISTORY_DEFAULT_SECONDS if since is None else since
        after = decode_cursor(cursor, Number)
        items, last = await server.store.list_history(
            sn, since=start, limit=limit, after=None if after is None else float(after[0]),
            org=org)
        return {"items": items, "next_cursor": None if last is None else encode_cursor(last)}

    @app.get("/robots/{sn}/tasks", summary="A robot's latest tasks (each at its newest "
                                            "state), the one started last first")
    async def tasks(sn: str, principal: Reader,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
        org = (await visible_robot(principal, sn))["org_id"]
        return {"items": await server.store.list_tasks(sn, limit=limit, org=org),
                "next_cursor": None}

    @app.post("/devices/{device_id}/commands",
              summary="Send a command to a gateway and wait for its response",
              responses={504: {"description": "The gateway did not answer within the timeout"}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": CommandRequest.model_json_schema()}}}})
    async def send_command(device_id: str, request: Request) -> JSONResponse:
        principal = access.principal(request)
        access.require_role(principal, READERS, "see gateways")
        body = parse_model(CommandRequest, await read_body(request, 64 * 1024))
        org = body.org_id or server.org_of(device_id, principal)
        access.require_org(principal, org, f"gateway {device_id} not found")
        access.require_role(principal, OPERATORS, "send commands")
        wait = min(body.timeout, server.settings.command_timeout_max)
        outcome = await server.commands.send(org, device_id, Command(body.command, body.args),
                                             wait)
        await server.record_command(outcome, principal.name)
        if outcome.response is None:
            raise CommandTimeoutError(device_id, wait, outcome.command.message_id)
        return JSONResponse(outcome.answer())

    @app.get("/gateways", summary="Each gateway's presence (retained online / last-will offline)")
    async def gateways(principal: Reader, limit: Limit = DEFAULT_LIMIT,
                       cursor: str | None = None) -> dict[str, Any]:
        after = decode_cursor(cursor, Text, Text)
        mine = sorted((g for g in server.gateways.values() if principal.covers(g["org_id"])),
                      key=lambda g: (g["org_id"], g["gateway_id"]))
        if after is not None:
            mine = [g for g in mine if [g["org_id"], g["gateway_id"]] > after]
        return page(mine[:limit + 1], limit, ["org_id", "gateway_id"])

    from callback_server.pudu_routes import create_pudu_router

    app.include_router(create_pudu_router(server, access))

    from callback_server.alerts.routes import create_alert_router

    app.include_router(create_alert_router(server, access))

    from fastapi.staticfiles import StaticFiles

    from callback_server.console import ASSETS, create_console_router

    app.mount("/console/static", StaticFiles(directory=ASSETS), name="console-assets")
    app.include_router(create_console_router(server, access, server.console))

    @app.get("/metrics", summary="Prometheus metrics (keys whose orgs are [\"*\"])",
             response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        access.require_all_orgs(access.principal(request), "/metrics")
        server.refresh_gauges()
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
