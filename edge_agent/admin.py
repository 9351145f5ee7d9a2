"""The admin listener's own route, ``/metrics``; the service mounts it beside the docs,
the REST MQTT proxy and the ``/pudu/*`` routes (edge_agent.pudu.admin)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_agent.ports import AdminAgent

__all__ = ["router"]

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus(agent: AdminAgent) -> Response:
    agent.refresh_gauges()
    return Response(generate_latest(agent.metrics.registry), media_type=CONTENT_TYPE_LATEST)
