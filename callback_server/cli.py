"""``callback-server run | check-config [--connect] | migrate [--plan]
[--drop-added-columns] | keys add|list|remove | probe``:
maps flags onto CallbackSettings and nothing more (exit codes: bridge.service.lifecycle)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bridge.errors import ConfigError, FleetError
from bridge.service.command_line import (
    add_as_service,
    add_completion,
    add_probe,
    as_service,
    check_config,
    completion,
    guarded,
    load_or_exit,
    log_sources,
    parser,
    report_problems,
    root_warning,
)
from bridge.service.lifecycle import EXIT_CONFIG, run_main
from bridge.service.probe import local_url, probe
from callback_server import config_checks
from callback_server import settings as config
from callback_server.keys import ROLES, add_key, read_file, remove_key

PROG = "callback-server"
UNIT = "callback-server.service"

DESCRIPTION = """\
The cloud side: consumes the gateways' MQTT stream (and IoT Rule HTTP pushes), writes it
to MySQL or SQLite, serves the API and console, and sends commands to the gateways."""

EPILOG = """\
examples:
  callback-server --config /etc/callback-server/config.yaml check-config
  sudo callback-server --config /etc/callback-server/config.yaml check-config --as-service
                                      as the unit's user, inside the unit's sandbox
  callback-server --config /etc/callback-server/config.yaml migrate
  sudo callback-server --config /etc/callback-server/config.yaml keys add \\
      --name ops --org acme --role viewer        then: systemctl reload callback-server

files (as installed):
  /etc/callback-server/config.yaml     settings (environment variables override them)
  /etc/callback-server/env             environment overrides read by the unit
  /etc/callback-server/keys.yaml       API key hashes (keys add|list|remove)
  /etc/callback-server/credentials/    secrets handed over by systemd (LoadCredential=)

exit status: 0 ok, 1 configuration error (said on one line), 2 usage error, 3 port in use.
logs: journalctl -u callback-server (-p warning for the problems only)."""
#: What the container's health check asks (the load balancer's and orchestrator's question).
HEALTH_READY = "/callback/health?ready=1"


async def _migrate(settings: config.CallbackSettings, args: argparse.Namespace) -> list[str]:
    from callback_server.store import load_targets, open_store

    targets = load_targets(settings.database_config) if settings.database_config else None
    async with open_store(settings.database_url, targets=targets) as store:
        return await store.migrate(apply=not args.plan, drop_added=args.drop_added_columns)


def _keys(args: argparse.Namespace, path: str | None) -> int:
    if not path:
        print(f"{PROG}: set API_KEYS_FILE or pass --file", file=sys.stderr)
        return EXIT_CONFIG
    file = Path(path)
    try:
        if args.keys_command == "add":
            key = add_key(file, args.name, args.orgs, args.role)
            print(key)
            print(f"# key {args.name!r} added to {file}; it is not shown again. Send the "
                  "server SIGHUP (systemctl reload callback-server) to load it.",
                  file=sys.stderr)
        elif args.keys_command == "list":
            for entry in read_file(file).keys:
                print(f"{entry.name}\t{','.join(entry.orgs)}\t{entry.role}")
        elif not remove_key(file, args.name):
            print(f"{PROG}: no key named {args.name!r} in {file}", file=sys.stderr)
            return EXIT_CONFIG
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # e.g. /etc/callback-server is root's: the hint is sudo
        print(f"{PROG}: cannot change {file}: {exc.strerror or exc} (run it as the file's "
              "owner, e.g. with sudo)", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _check_config(args: argparse.Namespace) -> int:
    """``check-config``: the settings as this process's environment gives them."""
    settings = load_or_exit(PROG, lambda: config.load(getattr(args, "config", None)))
    if isinstance(settings, int):
        return settings
    return check_config(PROG, settings, config_checks.problems,
                        config_checks.connect_problems if args.connect else None)


def _main(argv: list[str] | None) -> int:
    top, sub, common = parser(PROG, DESCRIPTION, "CALLBACK_SERVER_CONFIG", EPILOG)
    sub.add_parser("run", parents=[common], help="run the service (creates missing tables first)")
    check = sub.add_parser("check-config", parents=[common],
                           help="run the checks `run` runs, then print the effective settings")
    check.add_argument("--connect", action="store_true",
                       help="also connect to the broker and the database")
    add_as_service(check, UNIT)
    migrate = sub.add_parser(
        "migrate", parents=[common],
        help="create and upgrade the product's own tables; print, per target table, whether "
             "it is owned or only written, then exit (docs/storage.md)")
    migrate.add_argument("--plan", action="store_true",
                         help="only print what it would create or change")
    migrate.add_argument("--drop-added-columns", action="store_true",
                         help="drop the columns an earlier version added to target tables "
                              "it did not create (nothing is dropped without this)")
    keys = sub.add_parser("keys", parents=[common], help="manage API_KEYS_FILE (SIGHUP after)")
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
    add_completion(sub)
    add_probe(sub, common, "HTTP")
    args = top.parse_args(argv)
    if args.command == "completion":
        return completion(top)
    if args.command == "check-config" and args.as_service:
        return as_service(PROG, UNIT, args.unit, lambda: _check_config(args),
                          preload=("callback_server.service", "callback_server.store",
                                   "callback_server.keys", "callback_server.alerts"))
    if args.command == "check-config":
        root_warning(PROG, UNIT)
        return _check_config(args)
    if args.command == "keys" and args.file:
        return _keys(args, args.file)  # needs no other setting
    settings = load_or_exit(PROG, lambda: config.load(getattr(args, "config", None)))
    if isinstance(settings, int):
        return settings
    if args.command == "keys":
        return _keys(args, settings.api_keys_file)
    if args.command == "probe":
        return probe(PROG, args.url or local_url(settings.http_host, settings.http_port,
                                                 HEALTH_READY), args.timeout)
    found = config_checks.problems(settings)
    if found:
        return report_problems(PROG, found)
    from bridge.service.logs import setup_logging

    setup_logging(settings.log_level, log_file=settings.log_file)
    log_sources(settings)
    if args.command == "migrate":
        try:
            report = asyncio.run(_migrate(settings, args))
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
