"""Routes for the Pudu cloud side of the fleet: poll run records and robot commands.

A router of its own (app.py includes it); access is the app's (callback_server.access),
lists are the app's pages (bridge.http.paging).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bridge.commands import Command, CommandTimeout
from bridge.errors import CommandTimeoutError, NotFoundError
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
from callback_server.access import Access, Principal, Reader, Rules
from callback_server.ports import AppHost, Host


class RobotCommandRequest(BaseModel):
    """Body of ``POST /robots/{sn}/commands``; ``args.sn`` is set from the path."""

    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    timeout: CommandTimeout = 10.0


router = APIRouter()


@router.get("/ingestion-runs", summary="Pudu cloud poll runs the gateways reported, "
                                       "newest first",
            responses={404: {"description": "`org_id` is not one of the key's orgs"}})
async def ingestion_runs(principal: Reader, server: Host, access: Rules,
                         limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                         cursor: str | None = Query(None, max_length=1000),
                         org_id: str | None = Query(None, max_length=128),
                         ) -> dict[str, Any]:
    if org_id is not None:
        access.require_org(principal, org_id, f"org {org_id} not found")
    after = decode_cursor(cursor, Number, Text)
    items, last = await server.store.get_runs(
        limit, None if after is None else (float(after[0]), str(after[1])), org_id,
        orgs=None if principal.all_orgs else sorted(principal.orgs))
    return Page(items, last).body()


async def _reported_robot(server: AppHost, access: Access, principal: Principal,
                          sn: str) -> tuple[str, str]:
    """(org, gateway) of robot ``sn`` as the caller's orgs hold it; 404 if none does, or
    no gateway has reported it."""
    # the key's orgs: two orgs may have robots with this sn, the other heard of last
    robot = await server.store.get_robot(
        sn, None if principal.all_orgs else sorted(principal.orgs))
    if robot is None:  # the same answer as another org's robot: nothing leaks
        raise NotFoundError(f"robot {sn} not found")
    if not robot.get("gateway_id") or not robot.get("org_id"):
        raise NotFoundError(f"robot {sn} not found (no gateway has reported it)")
    access.require_org(principal, robot.get("org_id"), f"robot {sn} not found")
    return str(robot["org_id"]), str(robot["gateway_id"])


@router.post("/robots/{sn}/commands",
             summary="Send a command to the gateway that last reported this robot",
             responses={504: {"description": "The gateway did not answer in time"}},
             openapi_extra=json_body(RobotCommandRequest))
async def robot_command(sn: str, request: Request, principal: Reader, server: Host,
                        access: Rules) -> JSONResponse:
    body = parse_model(RobotCommandRequest, await read_body(request, 64 * 1024))
    org, gateway = await _reported_robot(server, access, principal, sn)
    access.require_operator(principal, "send commands")
    wait = min(body.timeout, server.settings.command_timeout_max)
    command = Command(body.command, {**body.args, "sn": sn})
    outcome = await server.commands.send(org, gateway, command, wait)
    await server.record_command(outcome, principal.name)
    if outcome.response is None:
        raise CommandTimeoutError(gateway, wait, command.message_id)
    return JSONResponse({**outcome.answer(), "gateway_id": gateway})
