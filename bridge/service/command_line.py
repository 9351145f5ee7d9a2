"""What both services' command lines share: ``--config``, check-config, exit codes, and
no traceback for any operator mistake (``check-config | head`` included)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from bridge.errors import ConfigError
from bridge.service.completion import bash_script
from bridge.service.lifecycle import EXIT_CONFIG, EXIT_OK
from bridge.service.settings_loader import Settings, masked
from bridge.service.version import describe

__all__ = ["add_as_service", "add_completion", "add_probe", "as_service", "check_config",
           "completion", "guarded", "load_or_exit", "log_sources", "parser", "report_problems",
           "report_warnings", "root_warning"]

S = TypeVar("S", bound=BaseModel)


def parser(prog: str, description: str | None, env_var: str, epilog: str | None = None
           ) -> tuple[argparse.ArgumentParser, Any, argparse.ArgumentParser]:
    """The top parser, its subcommands, and the parent every subcommand takes (so
    ``--config`` works before or after the subcommand). ``description`` and ``epilog``
    are shown as written (an operator's text, not a reflowed docstring)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"YAML settings file (or {env_var})")
    top = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--config", metavar="FILE", help=f"YAML settings file (or {env_var})")
    top.add_argument("--version", action="version", version=describe(prog),
                     help="print the version and build (git commit or wheel digest)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return top, sub, common


def add_completion(sub: Any) -> None:
    """The ``completion bash`` subcommand (answered before any settings are read)."""
    completion = sub.add_parser("completion", help="print the bash completion script")
    completion.add_argument("shell", choices=["bash"])


def completion(top: argparse.ArgumentParser) -> int:
    """``completion bash``: the script on stdout."""
    print(bash_script(top), end="")
    return EXIT_OK


def add_probe(sub: Any, common: argparse.ArgumentParser, listener: str) -> None:
    """``probe [--url URL] [--timeout S]``: the container health check (bridge.service.probe)."""
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


def report_sources(prog: str, settings: BaseModel) -> None:
    """Where settings came from, on stderr: seed names used and which source won where
    two gave a setting (notes), seed names not honoured (warnings)."""
    if isinstance(settings, Settings):
        for note in settings.source_notes:
            print(f"{prog}: note: {note}", file=sys.stderr)
        report_warnings(prog, settings.source_warnings)


def log_sources(settings: BaseModel) -> None:
    """``report_sources`` for ``run``: the same lines in the service's log."""
    if isinstance(settings, Settings):
        log = logging.getLogger("settings")
        for note in settings.source_notes:
            log.info("%s", note)
        for warning in settings.source_warnings:
            log.warning("%s", warning)


def check_config(prog: str, settings: S, problems: Callable[[S], list[str]],
                 connect: Callable[[S], Coroutine[Any, Any, list[str]]] | None,
                 warnings: Callable[[S], list[str]] | None = None) -> int:
    """``check-config [--connect]``: exactly the checks ``run`` makes, then the settings
    (secrets masked) on stdout. Warnings are printed (stderr) but do not fail it."""
    found = problems(settings) if connect is None else asyncio.run(connect(settings))
    report_sources(prog, settings)
    if warnings is not None:
        report_warnings(prog, warnings(settings))
    if found:
        return report_problems(prog, found)
    print(json.dumps(masked(settings), indent=2))
    return EXIT_OK


def add_as_service(check: argparse.ArgumentParser, unit: str) -> None:
    """``check-config --as-service [--unit FILE]`` (bridge.service.unit_view)."""
    check.add_argument("--as-service", action="store_true",
                       help=f"as root: check as {unit}'s user, inside its sandbox, with its "
                            "credentials and environment (what the service will meet)")
    check.add_argument("--unit", metavar="FILE",
                       help=f"the unit file (default: the installed {unit} and its drop-ins)")


def as_service(prog: str, unit: str, unit_file: str | None, check: Callable[[], int],
               preload: tuple[str, ...] = ()) -> int:
    """``check()`` as the unit's user in its sandbox; configuration errors on one line.
    ``preload``: the modules the checks import lazily (bridge.service.unit_view.run_in_unit)."""
    from pathlib import Path

    from bridge.service.unit_view import find_unit, read_unit, run_in_unit

    try:
        view = read_unit(Path(unit_file) if unit_file else find_unit(unit))
        print(f"{prog}: checking as {view.user} in the sandbox of {view.path}",
              file=sys.stderr)
        return run_in_unit(view, check, preload)
    except (ConfigError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def root_warning(prog: str, unit: str) -> None:
    """As root with the unit installed, a plain check-config may pass what the service's
    user is refused: say so (on stderr; it does not fail)."""
    if os.geteuid() != 0:
        return
    from bridge.service.unit_view import find_unit

    try:
        find_unit(unit)
    except ConfigError:
        return
    report_warnings(prog, [f"run as root: files only root can read pass here; "
                           f"--as-service checks as {unit}'s user, in its sandbox"])


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
