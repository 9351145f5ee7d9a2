"""The callback server's HTTP app: IoT Rule ingest, health, read API, /metrics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from bridge import strictjson
from bridge.commands import Command
from bridge.docs import install_docs
from bridge.envelope import Envelope
from bridge.errors import (
    CommandTimeoutError,
    FleetError,
    InputError,
    NotFoundError,
    PayloadError,
    StoreError,
)
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
from bridge.topic import DeviceAddress, TopicScheme, channel_for, parse_device_topic
from callback_server.access import INGESTERS, OPERATORS, READERS, Access, Principal
from callback_server.consumer import consistent, handled_by_gateway
from callback_server.ports import AppHost

# An AWS IoT Rule HTTP action gives up after 3 s and retries; answer before that.
INGEST_TIMEOUT_SECONDS = 2.5


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
#: What ``GET /robots/{sn}/history`` returns without ``since``: the console's chart.
HISTORY_DEFAULT_SECONDS = 24 * 3600


class CommandRequest(BaseModel):
    """Body of ``POST /devices/{device_id}/commands``."""

    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(10.0, gt=0, le=3600)
    org_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Ingest:
    """One IoT Rule request, sorted: robot envelopes to store, gateway traffic to handle."""

    envelopes: list[tuple[str, Envelope]]
    gateway: list[tuple[str, DeviceAddress, bytes]]  # as sent: topic, its parts, payload


def _sort(server: AppHost, parsed: strictjson.Parsed,
          header_topic: str | None) -> _Ingest:
    """An IoT Rule body (one object or a list; topic from header or field), sorted by
    channel: the rule forwards gateway telemetry and responses too, which are not
    envelopes. Any fault is a FleetError naming it (the caller dead-letters the body)."""
    body = parsed.value
    objects = body if isinstance(body, list) else [body]
    if not objects:
        raise InputError("empty message list", status=422)
    prefix = server.settings.topic_prefix
    sorted_ = _Ingest([], [])
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise InputError("each message must be a JSON object", status=422)
        fields = dict(obj)
        topic = fields.pop("topic", None) or header_topic
        if topic is not None and not isinstance(topic, str):
            raise InputError("topic must be a string", field="topic", status=422)
        if topic is not None:
            address = parse_device_topic(topic, prefix)
            if handled_by_gateway(address.channel):
                sorted_.gateway.append((topic, address, strictjson.dumps(fields)))
                continue
        notes = _notes_of(parsed.notes, i) if isinstance(body, list) else parsed.notes
        envelope = Envelope.from_dict(fields, notes=notes)
        if topic is None:
            channel = envelope.channel or channel_for(envelope.type)
            topic = str(TopicScheme(envelope.org, prefix).device(envelope.device, channel))
            address = parse_device_topic(topic, prefix)
        if not consistent(address, envelope):
            raise InputError("envelope org/device differ from the topic's", status=422)
        sorted_.envelopes.append((topic, envelope))
    return sorted_


def _notes_of(notes: list[str], i: int) -> list[str]:
    """The parse notes about element ``i`` of a list body, as paths inside it
    (``[1].data.x: …`` -> ``data.x: …``); the "more were changed" note goes to each."""
    mine = f"[{i}]."
    return [note[len(mine):] if note.startswith(mine) else note for note in notes
            if note.startswith(mine) or not note.startswith("[")]


async def _dead_letter(server: AppHost, topic: str | None, raw: bytes,
                       reason: str) -> None:
    """Keep a refused ingest body, committed before the 4xx answer goes out."""
    await _keep_dead(server, [(topic or "http", raw)], reason)


async def _dead_letters(server: AppHost, ingest: _Ingest, reason: str) -> None:
    """Keep each part of a refused ingest request (envelope by envelope), with why."""
    parts = [(topic, envelope.to_json()) for topic, envelope in ingest.envelopes]
    parts += [(topic, payload) for topic, _, payload in ingest.gateway]
    await _keep_dead(server, parts, reason)


async def _keep_dead(server: AppHost, parts: list[tuple[str, bytes]],
                     reason: str) -> None:
    loop = asyncio.get_running_loop()
    waits: list[asyncio.Future[None]] = []
    for topic, raw in parts:
        done: asyncio.Future[None] = loop.create_future()

        def committed(done: asyncio.Future[None] = done) -> None:
            if not done.done():
                done.set_result(None)

        server.writer.submit_dead(topic, raw, reason, committed)
        waits.append(done)
    try:
        await asyncio.wait_for(asyncio.gather(*waits), INGEST_TIMEOUT_SECONDS)
    except TimeoutError:
        raise StoreError("dead letter not committed in time") from None


def create_app(server: AppHost) -> FastAPI:
    """Build the app around a running server."""
    app = FastAPI(title="Pudu fleet callback server", version=server.version,
                  docs_url=None, redoc_url=None)
    install_docs(app)

    install_error_handlers(app)

    access = server.access
    app.state.access = access

    @app.post("/callback/messages", summary="Ingest envelopes pushed by an AWS IoT Rule",
              responses={503: {"description": "Not committed in time; retry (idempotent)"}})
    async def ingest(
        request: Request,
        x_mqtt_topic: str | None = Header(default=None),
    ) -> dict[str, Any]:
        principal = access.principal(request, callback_header=True)
        access.require_role(principal, INGESTERS, "ingest messages")
        raw = await read_body(request, server.settings.max_body_bytes)
        try:
            parsed = strictjson.loads(raw)
        except PayloadError as exc:
            await _dead_letter(server, x_mqtt_topic, raw, str(exc))
            raise InputError(f"body is {exc}", status=400) from None
        try:
            ingest = _sort(server, parsed, x_mqtt_topic)
        except FleetError as exc:
            await _dead_letter(server, x_mqtt_topic, raw, str(exc))
            raise
        orgs = [e.org for _, e in ingest.envelopes] + [a.org_id for _, a, _ in ingest.gateway]
        try:
            access.refuse_foreign(principal, orgs)
        except InputError as exc:
            # The whole request is refused; each part is kept with why, as the rule
            # would otherwise retry it forever into the same refusal.
            await _dead_letters(server, ingest, f"refused: {exc.message}")
            raise
        for _, address, payload in ingest.gateway:
            server.consumer.on_gateway(address, payload)
        try:
            await asyncio.wait_for(server.writer.write(ingest.envelopes),
                                   INGEST_TIMEOUT_SECONDS)
        except TimeoutError:
            # Still queued and written once the database answers; the retry is idempotent.
            raise StoreError("write not committed in time") from None
        return {"status": "success", "stored": len(ingest.envelopes),
                "handled": len(ingest.gateway), "timestamp": int(time.time())}

    @app.get("/callback/health", summary="Broker and database state")
    async def health() -> JSONResponse:
        body = await server.health()
        return JSONResponse(body)

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

    @app.get("/metrics", summary="Prometheus metrics (keys whose orgs are [\"*\"])")
    async def metrics(request: Request) -> Response:
        access.require_all_orgs(access.principal(request), "/metrics")
        server.refresh_gauges()
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
