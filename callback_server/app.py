"""The callback server's HTTP app: IoT Rule ingest, health, read API, /metrics."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from bridge import strictjson
from bridge.commands import Command
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
from bridge.topic import DeviceAddress, TopicScheme, parse_device_topic
from callback_server.consumer import consistent, handled_by_gateway

if TYPE_CHECKING:
    from callback_server.service import CallbackServer

# An AWS IoT Rule HTTP action gives up after 3 s and retries; answer before that.
INGEST_TIMEOUT_SECONDS = 2.5


def _check_token(server: CallbackServer, given: str | None) -> None:
    token = server.settings.callback_token
    if token is None:
        raise InputError("HTTP ingest is disabled: set CALLBACK_TOKEN", status=403)
    if not given or not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise InputError("missing or invalid X-Callback-Token", status=401)


class CommandRequest(BaseModel):
    """Body of ``POST /devices/{device_id}/commands``."""

    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(10.0, gt=0, le=3600)
    org_id: str | None = None


def _check_operator(server: CallbackServer, authorization: str | None) -> None:
    token = server.settings.proxy_token
    if token is None:
        raise InputError("commands are disabled: set PROXY_TOKEN", status=403)
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise InputError("missing or invalid bearer token", status=401)


@dataclass(frozen=True, slots=True)
class _Ingest:
    """One IoT Rule request, sorted: robot envelopes to store, gateway traffic to handle."""

    envelopes: list[tuple[str, Envelope]]
    gateway: list[tuple[DeviceAddress, bytes]]


def _sort(server: CallbackServer, parsed: strictjson.Parsed,
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
    for obj in objects:
        if not isinstance(obj, dict):
            raise InputError("each message must be a JSON object", status=422)
        fields = dict(obj)
        topic = fields.pop("topic", None) or header_topic
        if topic is not None and not isinstance(topic, str):
            raise InputError("topic must be a string", field="topic", status=422)
        if topic is not None:
            address = parse_device_topic(topic, prefix)
            if handled_by_gateway(address.channel):
                sorted_.gateway.append((address, strictjson.dumps(fields)))
                continue
        envelope = Envelope.from_dict(fields, notes=parsed.notes)
        if topic is None:
            channel = envelope.channel or f"callback/{envelope.type}"
            topic = str(TopicScheme(envelope.org, prefix).device(envelope.device, channel))
            address = parse_device_topic(topic, prefix)
        if not consistent(address, envelope):
            raise InputError("envelope org/device differ from the topic's", status=422)
        sorted_.envelopes.append((topic, envelope))
    return sorted_


async def _dead_letter(server: CallbackServer, topic: str | None, raw: bytes,
                       reason: str) -> None:
    """Keep a refused ingest body, committed before the 4xx answer goes out."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def committed() -> None:
        if not done.done():
            done.set_result(None)

    server.writer.submit_dead(topic or "http", raw, reason, committed)
    try:
        await asyncio.wait_for(done, INGEST_TIMEOUT_SECONDS)
    except TimeoutError:
        raise StoreError("dead letter not committed in time") from None


def create_app(server: CallbackServer) -> FastAPI:
    """Build the app around a running server."""
    app = FastAPI(title="Pudu fleet callback server", version=server.version)

    install_error_handlers(app)

    @app.post("/callback/messages", summary="Ingest envelopes pushed by an AWS IoT Rule",
              responses={503: {"description": "Not committed in time; retry (idempotent)"}})
    async def ingest(
        request: Request,
        x_callback_token: str | None = Header(default=None),
        x_mqtt_topic: str | None = Header(default=None),
    ) -> dict[str, Any]:
        _check_token(server, x_callback_token)
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
        for address, payload in ingest.gateway:
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

    @app.get("/robots", summary="Latest state of every robot")
    async def robots() -> list[dict[str, Any]]:
        return await server.store.get_robots()

    @app.get("/robots/{sn}", summary="Latest state of one robot")
    async def robot(sn: str) -> JSONResponse:
        row = await server.store.get_robot(sn)
        if row is None:
            raise NotFoundError(f"robot {sn} not found")
        return JSONResponse(row)

    @app.get("/robots/{sn}/events", summary="A robot's events, newest first")
    async def events(sn: str, limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
        return await server.store.get_events(sn, limit)

    @app.post("/devices/{device_id}/commands",
              summary="Send a command to a gateway and wait for its response",
              responses={504: {"description": "The gateway did not answer within the timeout"}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": CommandRequest.model_json_schema()}}}})
    async def send_command(
        device_id: str, request: Request, authorization: str | None = Header(default=None)
    ) -> JSONResponse:
        _check_operator(server, authorization)
        body = parse_model(CommandRequest, await read_body(request, 64 * 1024))
        org = body.org_id or server.org_of(device_id)
        wait = min(body.timeout, server.settings.command_timeout_max)
        outcome = await server.commands.send(org, device_id, Command(body.command, body.args),
                                             wait)
        await server.record_command(outcome)
        if outcome.response is None:
            raise CommandTimeoutError(device_id, wait, outcome.command.message_id)
        r = outcome.response
        answer: dict[str, Any] = {"messageId": r.message_id, "status": r.status,
                                  "rtt_ms": outcome.rtt_ms}
        answer["result" if r.status == "success" else "error"] = (
            r.result if r.status == "success" else r.error
        )
        return JSONResponse(answer)

    @app.get("/gateways", summary="Each gateway's presence (retained online / last-will offline)")
    async def gateways() -> list[dict[str, Any]]:
        return sorted(server.gateways.values(), key=lambda g: (g["org_id"], g["gateway_id"]))

    from callback_server.pudu_routes import create_pudu_router

    app.include_router(create_pudu_router(server))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        server.refresh_gauges()
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
