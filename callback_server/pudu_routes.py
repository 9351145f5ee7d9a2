"""Routes for the Pudu cloud side of the fleet: poll run records and robot commands.

Kept out of app.py (which includes this router) so access control can change there
without touching these: ``POST /robots/{sn}/commands`` uses the app's operator check.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bridge.commands import Command
from bridge.errors import CommandTimeoutError, InputError, NotFoundError
from bridge.http_body import parse_model, read_body

if TYPE_CHECKING:
    from callback_server.service import CallbackServer


class RobotCommandRequest(BaseModel):
    """Body of ``POST /robots/{sn}/commands``; ``args.sn`` is set from the path."""

    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(10.0, gt=0, le=3600)


def encode_cursor(after: tuple[float, str] | None) -> str | None:
    if after is None:
        return None
    return base64.urlsafe_b64encode(json.dumps(list(after)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[float, str] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, key = json.loads(raw)
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not isinstance(key, str):
            raise ValueError("shape")
        return float(ts), key
    except (ValueError, TypeError) as exc:
        raise InputError("cursor is not one this server gave out", field="cursor") from exc


def create_pudu_router(server: CallbackServer) -> APIRouter:
    router = APIRouter()

    @router.get("/ingestion-runs", summary="Pudu cloud poll runs the gateways reported, "
                                           "newest first")
    async def ingestion_runs(limit: int = Query(100, ge=1, le=1000),
                             cursor: str | None = Query(None, max_length=1000),
                             org_id: str | None = Query(None, max_length=128),
                             ) -> dict[str, Any]:
        items, after = await server.store.get_runs(limit, decode_cursor(cursor), org_id)
        return {"items": items, "next_cursor": encode_cursor(after)}

    @router.post("/robots/{sn}/commands",
                 summary="Send a command to the gateway that last reported this robot",
                 responses={504: {"description": "The gateway did not answer in time"}},
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": RobotCommandRequest.model_json_schema()}}}})
    async def robot_command(sn: str, request: Request,
                            authorization: str | None = Header(default=None)) -> JSONResponse:
        from callback_server.app import _check_operator

        _check_operator(server, authorization)
        body = parse_model(RobotCommandRequest, await read_body(request, 64 * 1024))
        robot = await server.store.get_robot(sn)
        if robot is None or not robot.get("gateway_id") or not robot.get("org_id"):
            raise NotFoundError(f"robot {sn} not found (no gateway has reported it)")
        org, gateway = str(robot["org_id"]), str(robot["gateway_id"])
        wait = min(body.timeout, server.settings.command_timeout_max)
        command = Command(body.command, {**body.args, "sn": sn})
        outcome = await server.commands.send(org, gateway, command, wait)
        await server.record_command(outcome)
        if outcome.response is None:
            raise CommandTimeoutError(gateway, wait, command.message_id)
        r = outcome.response
        answer: dict[str, Any] = {"messageId": r.message_id, "status": r.status,
                                  "rtt_ms": outcome.rtt_ms, "gateway_id": gateway}
        answer["result" if r.status == "success" else "error"] = (
            r.result if r.status == "success" else r.error)
        return JSONResponse(answer)

    return router
