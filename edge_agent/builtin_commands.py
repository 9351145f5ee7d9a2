"""The gateway's built-in commands (ping, get_status, get_robots, flush_outbox, ...).

Site-specific commands come as plug-ins (edge_agent.plugins) and may not take these names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bridge.commands import CommandExecutor, Paged
from edge_agent.ports import CommandHost
from edge_agent.pudu.robot_commands import NAMES as PUDU_NAMES

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The built-in commands' names (with the ``pudu.*`` ones, BUILTIN_NAMES): not for plug-ins.
BUILTINS = ("ping", "get_status", "get_robots", "flush_outbox", "set_log_level",
            "requeue_rejected")
BUILTIN_NAMES = frozenset((*BUILTINS, *PUDU_NAMES))


def register_builtins(executor: CommandExecutor, agent: CommandHost) -> None:
    """Register the built-ins; more can be added with ``executor.register``."""

    async def ping(args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "time": time.time(), "gateway_id": agent.settings.gateway_id}

    async def get_status(args: dict[str, Any]) -> dict[str, Any]:
        # The commands available here, plug-ins included: what a caller may send next.
        return {**agent.health(), "commands": sorted(executor.handlers)}

    async def get_robots(args: dict[str, Any]) -> Paged:
        """The robots this gateway knows, by sn, a page at a time: ``{"items",
        "next_cursor"}``; ``cursor`` (an sn) resumes after it, ``limit`` caps the page.
        The executor cuts a page to what the transport carries (AWS IoT: 128 KiB)."""
        limit = args.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 1):
            raise ValueError("limit must be a positive integer")
        cursor = args.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise ValueError("cursor must be a string (the next_cursor of a page)")
        robots = sorted((r for sn, r in agent.robots.items()
                         if cursor is None or sn > cursor), key=lambda r: str(r["sn"]))
        more = limit is not None and len(robots) > limit
        return Paged(robots[:limit] if limit is not None else robots,
                     cursor_of=lambda r: str(r["sn"]), more=more)

    async def flush_outbox(args: dict[str, Any]) -> dict[str, Any]:
        wait = float(args.get("timeout", 10))
        try:
            async with asyncio.timeout(wait):
                await agent.publisher.wait_drained()
        except TimeoutError:
            return {"flushed": False, "outbox_depth": agent.outbox.depth}
        return {"flushed": True, "outbox_depth": agent.outbox.depth}

    async def set_log_level(args: dict[str, Any]) -> dict[str, Any]:
        level = str(args.get("level", "")).upper()
        if level not in _LEVELS:
            raise ValueError(f"level must be one of {', '.join(_LEVELS)}")
        logging.getLogger().setLevel(level)
        return {"level": level}

    async def requeue_rejected(args: dict[str, Any]) -> dict[str, Any]:
        """After the cause is fixed (say, the IoT policy), send the set-aside entries again."""
        return {"requeued": await agent.outbox.requeue_rejected(),
                "outbox_depth": agent.outbox.depth}

    handlers = (("ping", ping), ("get_status", get_status), ("get_robots", get_robots),
                     ("flush_outbox", flush_outbox), ("set_log_level", set_log_level),
                ("requeue_rejected", requeue_rejected))
    for name, fn in handlers:
        executor.register(name, fn)
