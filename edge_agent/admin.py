"""The admin listener's own routes: ``/metrics``, and what ``/mqtt/*`` answers while the
REST MQTT proxy is off. The service mounts them beside the docs, the proxy and the
``/pudu/*`` routes (edge_agent.pudu.admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Match
from starlette.types import Scope

from bridge.errors import NotFoundError
from edge_agent.ports import AdminAgent

__all__ = ["PROXY_OFF", "router"]

#: The answer (404) to ``/mqtt/*`` on a listener with no proxy: a bare "Not Found" left
#: a user of the replaced proxy's ENABLE_CALLBACKS guessing what to turn on.
PROXY_OFF = ("the REST MQTT proxy is off on this edge agent: set PROXY_TOKEN to turn it "
             "on (requests then carry 'Authorization: Bearer <PROXY_TOKEN>')")
_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class _WhileProxyOff(APIRoute):
    """A route that exists only while the agent's proxy is off: with the proxy mounted,
    its own 404 and 405 answers stand."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["app"].state.agent.proxy.enabled:  # the service mounts it then
            return Match.NONE, {}
        return super().matches(scope)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus(agent: AdminAgent) -> Response:
    agent.refresh_gauges()
    return Response(generate_latest(agent.metrics.registry), media_type=CONTENT_TYPE_LATEST)


#: Routes of an admin listener whose proxy is off.
_proxy_off = APIRouter(route_class=_WhileProxyOff)


@_proxy_off.api_route("/mqtt/{rest:path}", methods=_EVERY_METHOD, include_in_schema=False)
async def proxy_off(rest: str) -> Any:
    raise NotFoundError(PROXY_OFF)


router.include_router(_proxy_off)
