"""``edge-agent poll --once``: ask the running agent for a run, or run one here."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from edge_agent.settings import EdgeSettings

log = logging.getLogger(__name__)

#: A run may retry every call; the admin answer waits for the whole run.
ANSWER_TIMEOUT_SECONDS = 600.0


async def poll_once(settings: EdgeSettings, out: list[dict[str, Any]]) -> None:
    """Append the record of one run to ``out``: from the running agent's admin listener
    if there is one, else from a run of our own (publishing through the outbox, then
    waiting up to 30 s for the broker to take it)."""
    host = settings.admin_host if settings.admin_host not in ("0.0.0.0", "::", "") \
        else "127.0.0.1"
    headers = {}
    if settings.proxy_token is not None:
        headers["Authorization"] = f"Bearer {settings.proxy_token.get_secret_value()}"
    url = f"http://{host}:{settings.admin_port}/pudu/poll"
    try:
        # Loopback only (the agent's own admin listener): the outbound rule is not needed.
        async with httpx.AsyncClient(timeout=ANSWER_TIMEOUT_SECONDS, trust_env=False) as c:
            reply = await c.post(url, headers=headers)
        if reply.status_code == 200:
            out.append(reply.json())
            return
        raise RuntimeError(f"the running agent answered {reply.status_code}: {reply.text}")
    except httpx.ConnectError:
        log.info("no agent answers on %s; running one reconciliation here", url)
    from edge_agent.service import EdgeAgent

    agent = EdgeAgent(settings)
    agent.schedule_polls = False
    async with agent:
        out.append(await agent.poller.run_once())
        try:
            await asyncio.wait_for(agent.publisher.wait_drained(), 30.0)
        except TimeoutError:
            log.warning("broker did not take everything within 30 s; the outbox keeps "
                        "%d entries for the agent to send", agent.outbox.depth)
