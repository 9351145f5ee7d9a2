"""``callback-server run | migrate``: maps flags onto CallbackSettings and nothing more."""

from __future__ import annotations

import argparse
import asyncio
import sys

from bridge.errors import ConfigError, StoreError
from bridge.lifecycle import run_main
from bridge.logs import setup_logging
from callback_server import config


async def _migrate(settings: config.CallbackSettings) -> None:
    from callback_server.store import load_targets, open_store

    targets = load_targets(settings.database_config) if settings.database_config else None
    async with open_store(settings.database_url, targets=targets) as store:
        await store.migrate()


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML settings file (or CALLBACK_SERVER_CONFIG)")
    parser = argparse.ArgumentParser(prog="callback-server", description=__doc__)
    parser.add_argument("--config", help="YAML settings file (or CALLBACK_SERVER_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the service (creates missing tables first)")
    sub.add_parser("migrate", parents=[common], help="create missing tables and columns, then exit")
    args = parser.parse_args(argv)
    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        print(f"callback-server: configuration error: {exc}", file=sys.stderr)
        return 1
    setup_logging(settings.log_level)
    if args.command == "migrate":
        try:
            asyncio.run(_migrate(settings))
        except StoreError as exc:
            print(f"callback-server: migration failed: {exc}", file=sys.stderr)
            return 1
        print("callback-server: tables are up to date")
        return 0
    from callback_server.service import serve

    return run_main("callback-server", serve(settings))


if __name__ == "__main__":
    sys.exit(main())
