"""The callback server's HTTP app: IoT Rule ingest, health, read API, /metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from bridge.commands import Command
from bridge.envelope import Envelope
from bridge.errors import FleetError, InputError, PayloadError, StoreError, TopicError
from bridge.topic import TopicScheme, parse_device_topic

if TYPE_CHECKING:
    from callback_server.service import CallbackServer

# An AWS IoT Rule HTTP action gives up after 3 s and retries; answer before that.
INGEST_TIMEOUT_SECONDS = 2.5


def error_response(exc: FleetError) -> JSONResponse:
    """The one place where the callback server maps its errors to HTTP."""
    if isinstance(exc, InputError):
        status, message = exc.status, exc.message
    elif isinstance(exc, (PayloadError, TopicError)):
        status, message = 422, str(exc)
    elif isinstance(exc, StoreError):
        status, message = 503, "database unavailable; retry later"
    else:
        status, message = 500, "internal error"
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(
        {"status": "error", "message": message, "timestamp": int(time.time())},
        status_code=status, headers=headers,
    )


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


def _items(
    server: CallbackServer, body: Any, header_topic: str | None
) -> list[tuple[str, Envelope]]:
    """Envelopes from an IoT Rule body: one object or a list; topic from header or field."""
    objects = body if isinstance(body, list) else [body]
    if not objects:
        raise InputError("empty message list", status=422)
    prefix = server.settings.topic_prefix
    items = []
    for obj in objects:
        if not isinstance(obj, dict):
            raise InputError("each message must be a JSON object", status=422)
        fields = dict(obj)
        topic = fields.pop("topic", None) or header_topic
        envelope = Envelope.from_dict(fields)
        if topic is None:
            channel = envelope.channel or f"callback/{envelope.type}"
            topic = str(TopicScheme(envelope.org, prefix).device(envelope.device, channel))
        address = parse_device_topic(str(topic), prefix)
        if (address.org_id, address.device_id) != (envelope.org, envelope.device):
            raise InputError("envelope org/device differ from the topic's", status=422)
        items.append((str(topic), envelope))
    return items


def create_app(server: CallbackServer) -> FastAPI:
    """Build the app around a running server."""
    app = FastAPI(title="Pudu fleet callback server", version=server.version)

    @app.exception_handler(FleetError)
    async def _fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        return error_response(exc)

    @app.post("/callback/messages", summary="Ingest envelopes pushed by an AWS IoT Rule")
    async def ingest(
        request: Request,
        x_callback_token: str | None = Header(default=None),
        x_mqtt_topic: str | None = Header(default=None),
    ) -> dict[str, Any]:
        _check_token(server, x_callback_token)
        raw = await request.body()
        if len(raw) > server.settings.max_body_bytes:
            raise InputError("body too large", status=413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"body is not valid JSON: {exc}", status=400) from None
        try:
            items = _items(server, body, x_mqtt_topic)
        except (InputError, PayloadError, TopicError) as exc:
            server.writer.submit_dead(x_mqtt_topic or "http", raw, str(exc), lambda: None)
            raise
        try:
            await asyncio.wait_for(server.writer.write(items), INGEST_TIMEOUT_SECONDS)
        except TimeoutError:
            # Still queued and written once the database answers; the retry is idempotent.
            raise StoreError("write not committed in time") from None
        return {"status": "success", "stored": len(items), "timestamp": int(time.time())}

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
            return JSONResponse({"status": "error", "message": f"robot {sn} not found"}, 404)
        return JSONResponse(row)

    @app.get("/robots/{sn}/events", summary="A robot's events, newest first")
    async def events(sn: str, limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
        return await server.store.get_events(sn, limit)

    @app.post("/devices/{device_id}/commands",
              summary="Send a command to a gateway and wait for its response",
              responses={504: {"description": "The gateway did not answer within the timeout"}})
    async def send_command(
        device_id: str, body: CommandRequest, authorization: str | None = Header(default=None)
    ) -> JSONResponse:
        _check_operator(server, authorization)
        org = body.org_id or server.org_of(device_id)
        wait = min(body.timeout, server.settings.command_timeout_max)
        outcome = await server.commands.send(org, device_id, Command(body.command, body.args),
                                             wait)
        await server.record_command(outcome)
        if outcome.response is None:
            return JSONResponse(
                {"status": "error", "messageId": outcome.command.message_id,
                 "message": f"no response from {device_id} within {wait} s"},
                status_code=504,
            )
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

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        server.refresh_gauges()
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
