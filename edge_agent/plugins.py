"""Site-specific gateway commands as plug-ins: entry points and ``command_plugins``.

A plug-in is an async callable taking the command's ``args`` (a dict) and returning the
result (anything JSON can carry). It is found either through the entry-point group
``pudu_fleet_bridge.commands`` (a package: name -> ``module:function``) or in the
settings' ``command_plugins`` (``{name: "module:function"}``; ``COMMAND_PLUGINS`` as
``name=module:function,...``) for code that is not a package. Each runs under
``command_plugin_timeout_seconds``; a raising or slow one answers ``error`` and the agent
goes on. A plug-in may not take a built-in's name: the agent refuses to start.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from bridge.commands import CommandExecutor, CommandFn
from bridge.errors import ConfigError
from edge_agent.settings import EdgeSettings

__all__ = ["ENTRY_POINT_GROUP", "Plugin", "discover", "problems", "register_plugins"]

ENTRY_POINT_GROUP = "pudu_fleet_bridge.commands"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Plugin:
    """A plug-in command before it is loaded: its name, target and where it was named."""

    name: str
    target: str  # "module:function"
    source: str  # "entry point <dist>" | "command_plugins"


def discover(settings: EdgeSettings) -> tuple[list[Plugin], list[str]]:
    """The plug-ins named by installed entry points and the settings, and the problems
    of naming (the same name twice). The settings name a plug-in only once (a mapping)."""
    found: dict[str, Plugin] = {}
    clashes: list[str] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        plugin = Plugin(ep.name, ep.value, f"entry point of {dist}")
        if ep.name in found and found[ep.name].target != ep.value:
            clashes.append(f"command plug-in {ep.name!r}: named by {found[ep.name].source} "
                           f"({found[ep.name].target}) and by {plugin.source} ({ep.value})")
        found[ep.name] = plugin
    for name, target in settings.command_plugins.items():
        if name in found and found[name].target != target:
            clashes.append(f"COMMAND_PLUGINS: {name!r} is also the {found[name].source} "
                           f"({found[name].target}); remove one")
        found[name] = Plugin(name, target, "command_plugins")
    return sorted(found.values(), key=lambda p: p.name), clashes


def load(plugin: Plugin) -> Callable[..., Any]:
    """Import ``plugin``'s function; ConfigError saying why it cannot be used."""
    module_name, sep, attr = plugin.target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"command plug-in {plugin.name!r} ({plugin.source}): "
                          f"{plugin.target!r} is not 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # an import error of any kind is the plug-in's problem
        raise ConfigError(f"command plug-in {plugin.name!r} ({plugin.source}): cannot load "
                          f"{plugin.target}: {type(exc).__name__}: {exc}") from exc
    call = getattr(obj, "__call__", None)  # noqa: B004 -- an async __call__ counts too
    if not (inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(call)):
        # A blocking function would stall every command and publish on the event loop.
        raise ConfigError(f"command plug-in {plugin.name!r} ({plugin.source}): "
                          f"{plugin.target} is not an async function")
    return obj  # type: ignore[no-any-return]


def problems(settings: EdgeSettings, builtins: frozenset[str]) -> list[str]:
    """One line per plug-in that would stop the agent from starting."""
    plugins, found = discover(settings)
    for plugin in plugins:
        if plugin.name in builtins:
            found.append(f"command plug-in {plugin.name!r} ({plugin.source}, "
                         f"{plugin.target}) would shadow the built-in command of that "
                         "name; give it another name")
            continue
        try:
            load(plugin)
        except ConfigError as exc:
            found.append(str(exc))
    return found


def register_plugins(executor: CommandExecutor, settings: EdgeSettings,
                     builtins: frozenset[str]) -> list[str]:
    """Register every plug-in (ConfigError listing the problems if any); their names."""
    found = problems(settings, builtins)
    if found:
        raise ConfigError("; ".join(found))
    plugins, _ = discover(settings)
    for plugin in plugins:
        executor.register(plugin.name, _guarded(plugin, load(plugin),
                                                settings.command_plugin_timeout_seconds))
    return [p.name for p in plugins]


def _guarded(plugin: Plugin, fn: Callable[..., Any], seconds: float) -> CommandFn:
    """``fn`` under a timeout, its every failure an exception the executor answers."""

    async def run(args: dict[str, Any]) -> Any:
        started = time.monotonic()
        try:
            async with asyncio.timeout(seconds):
                return await fn(args)
        except TimeoutError:
            raise TimeoutError(f"plug-in {plugin.name!r} did not answer within "
                               f"{seconds:g} s") from None
        except (SystemExit, KeyboardInterrupt) as exc:
            # sys.exit() in a plug-in must not stop the agent.
            raise RuntimeError(f"plug-in {plugin.name!r} tried to exit ({exc!r})") from None
        finally:
            took = time.monotonic() - started
            if took > seconds * 1.5 + 0.1:
                # A timeout can only fire at an await: this one blocked the event loop
                # (and with it every webhook, publish and command) for that long.
                log.warning("plug-in %r (%s) ran %.1f s, past its %g s timeout, without "
                            "yielding: it blocks the event loop; await instead, or move "
                            "blocking work to asyncio.to_thread", plugin.name,
                            plugin.target, took, seconds)

    return run
