"""What both services' command lines share: ``--config``, check-config, exit codes, and
no traceback for any operator mistake (``check-config | head`` included)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from bridge.config import masked
from bridge.errors import ConfigError
from bridge.lifecycle import EXIT_CONFIG, EXIT_OK

__all__ = ["add_probe", "check_config", "guarded", "load_or_exit", "parser", "report_problems",
           "report_warnings"]

S = TypeVar("S", bound=BaseModel)


def parser(prog: str, description: str | None, env_var: str
           ) -> tuple[argparse.ArgumentParser, Any, argparse.ArgumentParser]:
    """The top parser, its subcommands, and the parent every subcommand takes (so
    ``--config`` works before or after the subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help=f"YAML settings file (or {env_var})")
    top = argparse.ArgumentParser(prog=prog, description=description)
    top.add_argument("--config", help=f"YAML settings file (or {env_var})")
    sub = top.add_subparsers(dest="command", required=True)
    return top, sub, common


def add_probe(sub: Any, common: argparse.ArgumentParser, listener: str) -> None:
    """``probe [--url URL] [--timeout S]``: the container health check (bridge.probe)."""
    probe = sub.add_parser("probe", parents=[common],
                           help="exit 0 if the running service answers health ?ready=1 "
                                f"on its {listener} listener (loopback), else 1")
    probe.add_argument("--url", help="ask this URL instead (default: from the settings)")
    probe.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")


def report_problems(prog: str, problems: Sequence[str]) -> int:
    """One line per problem on stderr; the exit code (1 if any)."""
    for problem in problems:
        print(f"{prog}: {problem}", file=sys.stderr)
    return EXIT_CONFIG if problems else EXIT_OK


def report_warnings(prog: str, warnings: Sequence[str]) -> None:
    """One line per warning on stderr: allowed settings that are likely a mistake."""
    for warning in warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)


def check_config(prog: str, settings: S, problems: Callable[[S], list[str]],
                 connect: Callable[[S], Coroutine[Any, Any, list[str]]] | None,
                 warnings: Callable[[S], list[str]] | None = None) -> int:
    """``check-config [--connect]``: exactly the checks ``run`` makes, then the settings
    (secrets masked) on stdout. Warnings are printed (stderr) but do not fail it."""
    found = problems(settings) if connect is None else asyncio.run(connect(settings))
    if warnings is not None:
        report_warnings(prog, warnings(settings))
    if found:
        return report_problems(prog, found)
    print(json.dumps(masked(settings), indent=2))
    return EXIT_OK


def load_or_exit(prog: str, load: Callable[[], S]) -> S | int:
    """The settings, or the exit code after saying what is wrong."""
    try:
        return load()
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def guarded(main: Callable[[], int]) -> int:
    """``main()``; a reader that went away (``| head``) ends the output quietly."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice: point stdout at devnull so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return code
