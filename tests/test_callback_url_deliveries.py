"""The delivery log of ``callback_url`` pushes (GET /mqtt/subscriptions/{id}/deliveries) has
the webhooks' shape: one row per ended attempt with its status, latency and outcome
(delivered, failed and retried, gave_up). Real Mosquitto on 127.0.0.1:1883, a real
loopback receiver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.http.outbound import OutboundPolicy
from bridge.proxy import RetryPolicy
from tests.test_proxy import Env, PahoClient, running_proxy, serve


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    """A proxy whose pushes try 3 times with quick back-off, to a loopback receiver."""
    async with running_proxy("dlog", retry=RetryPolicy(attempts=3, base=0.05, cap=0.1),
                             outbound=OutboundPolicy(allow=("127.0.0.1/32",))) as running:
        yield running


async def test_each_ended_attempt_is_logged_as_webhook_deliveries_are(env: Env) -> None:
    arrived: asyncio.Queue[None] = asyncio.Queue()
    answer = asyncio.Event()  # the receiver holds its first answer until the test looked

    async def hook(request: Request) -> Response:
        await request.body()
        await arrived.put(None)
        await answer.wait()
        return Response(status_code=500)

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serve(receiver) as url, PahoClient() as outside:
        r = await env.client.post("/mqtt/subscribe", json={
            "topic": env.base + "slow/#", "callback_url": f"{url}/hook"})
        assert r.status_code == 200, r.text
        sub_id = r.json()["id"]
        await outside.publish(env.base + "slow/robot1", b'{"battery": 70}')
        await asyncio.wait_for(arrived.get(), 10)
        # The first POST has not been answered: it is not in the log (it has not failed).
        pending = await env.client.get(f"/mqtt/subscriptions/{sub_id}/deliveries")
        assert pending.status_code == 200 and pending.json()["items"] == []
        answer.set()
        for _ in range(2):  # the retries
            await asyncio.wait_for(arrived.get(), 10)
        await asyncio.wait_for(env.proxy.flush(), 10)
        items = (await env.client.get(f"/mqtt/subscriptions/{sub_id}/deliveries")
                 ).json()["items"]  # newest first
    assert [(i["attempt"], i["status"], i["outcome"]) for i in items] == [
        (3, 500, "gave_up"), (2, 500, "failed"), (1, 500, "failed")]
    assert all(isinstance(i["latency_ms"], float) and i["latency_ms"] >= 0 for i in items)
    assert all(isinstance(i["at"], float) for i in items)
    assert len({i["delivery_id"] for i in items}) == 1  # one delivery, retried
    (listed,) = env.proxy.subscriptions()
    assert (listed["delivered"], listed["failed"], listed["failed_attempts"]) == (0, 1, 3)
