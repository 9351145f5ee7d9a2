"""``callback-server run | check-config [--connect] | migrate``: maps flags onto
CallbackSettings and nothing more (exit codes: bridge.lifecycle)."""

from __future__ import annotations

import asyncio
import sys

from bridge.cli import check_config, guarded, load_or_exit, parser, report_problems
from bridge.errors import FleetError
from bridge.lifecycle import EXIT_CONFIG, run_main
from callback_server import checks, config

PROG = "callback-server"


async def _migrate(settings: config.CallbackSettings) -> list[str]:
    from callback_server.store import load_targets, open_store

    targets = load_targets(settings.database_config) if settings.database_config else None
    async with open_store(settings.database_url, targets=targets) as store:
        return await store.migrate()


def _main(argv: list[str] | None) -> int:
    top, sub, common = parser(PROG, __doc__, "CALLBACK_SERVER_CONFIG")
    sub.add_parser("run", parents=[common], help="run the service (creates missing tables first)")
    check = sub.add_parser("check-config", parents=[common],
                           help="run the checks `run` runs, then print the effective settings")
    check.add_argument("--connect", action="store_true",
                       help="also connect to the broker and the database")
    sub.add_parser("migrate", parents=[common], help="create missing tables and columns, then exit")
    args = top.parse_args(argv)
    settings = load_or_exit(PROG, lambda: config.load(getattr(args, "config", None)))
    if isinstance(settings, int):
        return settings
    if args.command == "check-config":
        return check_config(PROG, settings, checks.problems,
                            checks.connect_problems if args.connect else None)
    found = checks.problems(settings)
    if found:
        return report_problems(PROG, found)
    from bridge.logs import setup_logging

    setup_logging(settings.log_level)
    if args.command == "migrate":
        try:
            report = asyncio.run(_migrate(settings))
        except FleetError as exc:
            print(f"{PROG}: migration failed: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        for line in report:
            print(f"{PROG}: {line}")
        return 0
    from callback_server.service import serve

    return run_main(PROG, serve(settings))


def main(argv: list[str] | None = None) -> int:
    return guarded(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
