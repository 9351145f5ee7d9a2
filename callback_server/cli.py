"""``callback-server run | migrate | keys``: maps flags onto CallbackSettings and nothing more."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bridge.errors import ConfigError, StoreError
from bridge.logs import setup_logging
from bridge.loop import run as run_service
from callback_server import config
from callback_server.keys import ROLES, add_key, read_file, remove_key


async def _migrate(settings: config.CallbackSettings) -> None:
    from callback_server.store import load_targets, open_store

    targets = load_targets(settings.database_config) if settings.database_config else None
    async with open_store(settings.database_url, targets=targets) as store:
        await store.migrate()


def _keys(args: argparse.Namespace, path: str | None) -> int:
    if not path:
        print("callback-server: set API_KEYS_FILE or pass --file", file=sys.stderr)
        return 1
    file = Path(path)
    try:
        if args.keys_command == "add":
            key = add_key(file, args.name, args.orgs, args.role)
            print(key)
            print(f"# key {args.name!r} added to {file}; it is not shown again. Send the "
                  "server SIGHUP to load it.", file=sys.stderr)
        elif args.keys_command == "list":
            for entry in read_file(file).keys:
                print(f"{entry.name}\t{','.join(entry.orgs)}\t{entry.role}")
        elif not remove_key(file, args.name):
            print(f"callback-server: no key named {args.name!r} in {file}", file=sys.stderr)
            return 1
    except ConfigError as exc:
        print(f"callback-server: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML settings file (or CALLBACK_SERVER_CONFIG)")
    parser = argparse.ArgumentParser(prog="callback-server", description=__doc__)
    parser.add_argument("--config", help="YAML settings file (or CALLBACK_SERVER_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the service (creates missing tables first)")
    sub.add_parser("migrate", parents=[common], help="create missing tables and columns, then exit")
    keys = sub.add_parser("keys", parents=[common], help="manage API_KEYS_FILE (send SIGHUP after)")
    keys.add_argument("--file", help="the keys file (default: API_KEYS_FILE)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser("add", help="create a key; it is printed once, only its hash kept")
    add.add_argument("--name", required=True)
    add.add_argument("--org", action="append", required=True, dest="orgs",
                     help='an org the key covers (repeat for more; "*" for every org)')
    add.add_argument("--role", required=True, choices=ROLES)
    keys_sub.add_parser("list", help="names, orgs and roles (never keys)")
    remove = keys_sub.add_parser("remove", help="delete a key by name")
    remove.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        print(f"callback-server: configuration error: {exc}", file=sys.stderr)
        return 1
    if args.command == "keys":
        return _keys(args, args.file or settings.api_keys_file)
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

    try:
        run_service(serve(settings))
    except ConfigError as exc:  # found only when a part starts (e.g. a TLS key that does not fit)
        print(f"callback-server: configuration error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
