"""The public HTTP app: the Pudu webhook, its health check and /metrics.

The webhook endpoint reads the raw body itself instead of declaring a pydantic body
model: a callback must be accepted even when its shape is only roughly right (PUDU.md),
errors must name the field, and FastAPI's body-model path costs ~3x per request on the
hot path (MEASURED.md). The OpenAPI schema still describes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Route

from bridge.envelope import Envelope
from bridge.errors import FleetError, InputError, OutboxError, OutboxFullError
from bridge.outbox import PutResult
from edge_agent.normalize import normalize

if TYPE_CHECKING:
    from edge_agent.service import EdgeAgent

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
WEBHOOK_PATH = "/api/pudu/webhook"
_CALLBACK_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["callback_type", "data"],
                    "properties": {
                        "callback_type": {"type": "string", "example": "notifyRobotStatus"},
                        "data": {
                            "type": "object",
                            "required": ["sn"],
                            "properties": {"sn": {"type": "string"}},
                            "additionalProperties": True,
                        },
                    },
                }
            }
        },
    },
    "parameters": [
        {"name": "CallbackCode", "in": "header", "required": True, "schema": {"type": "string"}},
        {"name": "TraceId", "in": "header", "required": False, "schema": {"type": "string"}},
    ],
}


_WEBHOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Body is not a JSON object"},
    401: {"description": "Missing or wrong CallbackCode header"},
    413: {"description": "Body larger than MAX_BODY_BYTES"},
    422: {"description": "A field is missing or has the wrong type (the message names it)"},
    503: {"description": "Outbox full or unwritable; retry after the Retry-After seconds"},
}


def _error(status: int, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"status": "error", "message": message, "timestamp": int(time.time())}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: FleetError) -> JSONResponse:
    """The one place where the edge agent maps its errors to HTTP."""
    if isinstance(exc, InputError):
        return _error(exc.status, exc.message, exc.field)
    if isinstance(exc, OutboxFullError):
        return _error(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, OutboxError):
        return _error(503, "callback could not be stored; retry later",
                      headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    log.exception("unexpected error", exc_info=exc)
    return _error(500, "internal error")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise InputError(f"body larger than {limit} bytes", status=413)
        except ValueError:
            raise InputError("invalid Content-Length header", status=400) from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"body larger than {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(agent: EdgeAgent) -> FastAPI:
    """Build the public app around a running agent."""
    settings = agent.settings
    code = settings.pudu_callback_code.get_secret_value().encode()
    metrics = agent.metrics
    app = FastAPI(title="Pudu edge agent", version=agent.version, docs_url="/docs")

    @app.exception_handler(FleetError)
    async def _fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        if isinstance(exc, InputError):
            metrics.webhooks.labels(outcome=f"rejected_{exc.status}").inc()
        elif isinstance(exc, OutboxError):
            metrics.webhooks.labels(outcome="unavailable").inc()
        return error_response(exc)

    async def pudu_webhook(request: Request) -> JSONResponse:
        started = time.perf_counter()
        given = request.headers.get("callbackcode", "")
        # Constant-time comparison; an absent header compares like a wrong one.
        if not hmac.compare_digest(given.encode(), code):
            raise InputError("missing or invalid CallbackCode header", status=401)
        raw = await _read_body(request, settings.max_body_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"body is not valid JSON: {exc}", status=400) from None
        now = time.time()
        norm = normalize(body, received_at=now)
        device = norm.device_id or settings.gateway_id
        topic = agent.scheme.device(device, norm.channel)
        envelope = Envelope(
            id=norm.message_id, type=norm.callback_type, org=settings.org_id, device=device,
            gateway=settings.gateway_id, ts=norm.ts, received_at=now, data=norm.data,
            raw=norm.raw, channel=norm.channel,
        )
        keys = ["body:" + hashlib.sha256(raw).hexdigest()]
        trace = request.headers.get("traceid")
        if trace:
            keys.append("trace:" + trace[:128])
        result = await agent.outbox.put(
            str(topic), envelope.to_json(), qos=1, compact_key=norm.compact_key, dedup_keys=keys
        )
        agent.note_robot(envelope)
        duplicate = result is PutResult.DUPLICATE
        metrics.webhooks.labels(outcome="duplicate" if duplicate else "accepted").inc()
        metrics.accept_seconds.observe(time.perf_counter() - started)
        return JSONResponse({
            "status": "success",
            "message": "duplicate callback already accepted" if duplicate else "callback accepted",
            "timestamp": int(now),
            "data": {
                "robot_sn": norm.device_id,
                "callback_type": norm.callback_type,
                "message_id": norm.message_id,
                "topic": str(topic),
                "duplicate": duplicate,
            },
        })

    # The hot path is a plain Starlette route, matched before anything else: FastAPI's
    # per-request machinery costs ~120 us here (MEASURED.md). The FastAPI route below
    # is never reached; it is there so /openapi.json and /docs describe the endpoint.
    app.router.routes.insert(0, Route(WEBHOOK_PATH, pudu_webhook, methods=["POST"]))
    app.add_api_route(WEBHOOK_PATH, pudu_webhook, methods=["POST"],
                      openapi_extra=_CALLBACK_SCHEMA, responses=_WEBHOOK_RESPONSES,
                      summary="Receive a Pudu callback and store it durably before answering 200")

    @app.get("/api/pudu/webhook/health", summary="Broker connection and outbox state")
    async def health() -> dict[str, Any]:
        return agent.health()

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        agent.refresh_gauges()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
