"""Robot commands through the gateway that call the Pudu API (``pudu.*``).

Registered ``durable``: the command id is journaled before the API call, so a command
redelivered even after a restart is answered from the journal and never calls twice.
A handler's exception is its command's error answer (no key configured, robot unknown
to the key, or the API's refusal with its message).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from bridge.commands import CommandExecutor
from bridge.errors import PuduApiError
from bridge.pudu.command_catalogue import ROBOT_COMMANDS
from edge_agent.pudu.api_client import PuduClient, pick, robot_unknown

if TYPE_CHECKING:
    from edge_agent.ports import PuduHost

NAMES = tuple(command["name"] for command in ROBOT_COMMANDS)


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > 128:
        raise ValueError(f"args.{key} is required (a string)")
    return value.strip()


def _count(args: dict[str, Any], key: str) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
        raise ValueError(f"args.{key} must be a positive integer")
    return value


def register_pudu(executor: CommandExecutor, agent: PuduHost) -> None:
    """Add the ``pudu.*`` commands (they answer an error while no key is configured)."""

    def client() -> PuduClient:
        if not agent.settings.pudu.configured:
            raise ValueError("no Pudu API key configured: set PUDU_API_URL, PUDU_API_KEY "
                             "and PUDU_API_SECRET")
        return PuduClient(agent.settings.pudu, agent.outbound)

    def unknown(sn: str, why: str = "") -> ValueError:
        shops = agent.settings.pudu.shop_ids
        return ValueError(f"robot {sn} is unknown to this API key"
                          + (f" in shops {', '.join(shops)}" if shops and not why else "")
                          + (f" (Pudu: {why})" if why else ""))

    @asynccontextmanager
    async def api_for(sn: str) -> AsyncIterator[PuduClient]:
        """The client, with Pudu's robot-not-found refusal said as plainly as a robot
        missing from the shops' list is."""
        async with client() as api:
            try:
                yield api
            except PuduApiError as exc:
                if robot_unknown(exc):
                    raise unknown(sn, exc.message) from exc
                raise

    async def shop_of(api: PuduClient, sn: str) -> str:
        known = agent.poller.shop_of.get(sn)
        if known is not None:
            return known
        for shop in agent.settings.pudu.shop_ids or (None,):
            for robot in await api.robots(shop):
                if str(pick(robot, "sn")) == sn:
                    found = str(pick(robot, "shop_id", "shopId") or shop or "")
                    agent.poller.shop_of[sn] = found
                    return found
        raise unknown(sn)

    async def recharge(args: dict[str, Any]) -> Any:
        sn = _text(args, "sn")
        async with api_for(sn) as api:
            return await api.recharge(sn)

    async def switch_map(args: dict[str, Any]) -> Any:
        sn, map_name = _text(args, "sn"), _text(args, "map_name")
        async with api_for(sn) as api:
            shop = await shop_of(api, sn)
            code = await api.map_code(shop, map_name)
            return await api.switch_map(sn, map_name, code)

    async def position_reporting(args: dict[str, Any]) -> Any:
        sn = _text(args, "sn")
        interval, times = _count(args, "interval"), _count(args, "times")
        async with api_for(sn) as api:
            result = await api.position_reporting(sn, interval, times)
        return {"sn": sn, "interval": interval, "times": times, "result": result}

    for name, fn in zip(NAMES, (recharge, switch_map, position_reporting), strict=True):
        executor.register(name, fn, durable=True)
