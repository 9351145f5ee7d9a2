"""``edge-agent run | check-config [--connect] | outbox stats | outbox peek [-n N] |
poll --once | probe``: maps flags onto EdgeSettings and nothing more (exit codes:
bridge.service.lifecycle)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from bridge.errors import OutboxError
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
    report_warnings,
    root_warning,
)
from bridge.service.lifecycle import run_main
from bridge.service.probe import local_url, probe
from bridge.service.settings_loader import load_settings
from edge_agent import config_checks
from edge_agent import settings as config

PROG = "edge-agent"
UNIT = "edge-agent.service"

DESCRIPTION = """\
The site gateway's service: takes the Pudu robots' webhooks, keeps each one in a
durable outbox and publishes it over MQTT; answers the gateway commands sent back."""

EPILOG = """\
examples:
  edge-agent --config /etc/edge-agent/config.yaml check-config      after editing settings
  sudo edge-agent --config /etc/edge-agent/config.yaml check-config --as-service
                                      as the unit's user, inside the unit's sandbox
  edge-agent --config /etc/edge-agent/config.yaml outbox stats      backlog by channel
  edge-agent --config /etc/edge-agent/config.yaml outbox backup /var/backups/outbox.db

files (as installed):
  /etc/edge-agent/config.yaml     settings (environment variables override them)
  /etc/edge-agent/env             environment overrides read by the unit
  /etc/edge-agent/credentials/    secrets handed over by systemd (LoadCredential=)
  /var/lib/edge-agent/outbox.db   the outbox: undelivered entries survive restarts

exit status: 0 ok, 1 configuration error (said on one line), 2 usage error,
3 port in use or outbox held by another agent.
logs: journalctl -u edge-agent (-p warning for the problems only)."""
#: What the container's health check asks (the load balancer's and orchestrator's question).
HEALTH_READY = "/api/pudu/webhook/health?ready=1"


def _main(argv: list[str] | None) -> int:
    top, sub, common = parser(PROG, DESCRIPTION, "EDGE_AGENT_CONFIG", EPILOG)
    sub.add_parser("run", parents=[common], help="run the service")
    check = sub.add_parser("check-config", parents=[common],
                           help="run the checks `run` runs, then print the effective settings")
    check.add_argument("--connect", action="store_true", help="also connect to the broker")
    add_as_service(check, UNIT)
    outbox = sub.add_parser("outbox", parents=[common],
                            help="look into the outbox file (safe beside a running agent)")
    what = outbox.add_subparsers(dest="outbox_command", required=True)
    what.add_parser("stats", parents=[common], help="depth, ages, size, by channel")
    peek = what.add_parser("peek", parents=[common], help="the oldest entries")
    peek.add_argument("-n", type=int, default=10, help="how many (default 10)")
    backup = what.add_parser("backup", parents=[common],
                             help="copy the outbox while the agent runs (SQLite online backup)")
    backup.add_argument("dest", help="the new file (must not exist)")
    poll = sub.add_parser("poll", parents=[common],
                          help="run one Pudu cloud reconciliation and print its record")
    poll.add_argument("--once", action="store_true", required=True,
                      help="one run now (through the running agent if there is one)")
    add_completion(sub)
    add_probe(sub, common, "webhook")
    args = top.parse_args(argv)
    if args.command == "completion":
        return completion(top)
    if args.command == "check-config" and args.as_service:
        return as_service(PROG, UNIT, args.unit, lambda: _check_config(args),
                          preload=("edge_agent.service", "edge_agent.plugins"))
    if args.command == "check-config":
        root_warning(PROG, UNIT)
        return _check_config(args)
    if args.command == "outbox":
        return _outbox(args)
    settings = load_or_exit(PROG, lambda: config.load(getattr(args, "config", None)))
    if isinstance(settings, int):
        return settings
    if args.command == "probe":
        return probe(PROG, args.url or local_url(settings.http_host, settings.http_port,
                                                 HEALTH_READY), args.timeout)
    path = getattr(args, "config", None) or os.environ.get("EDGE_AGENT_CONFIG")
    found = config_checks.problems(settings, path)
    if found:
        return report_problems(PROG, found)
    if args.command == "run":
        report_warnings(PROG, config_checks.warnings(settings))
    from bridge.service.logs import setup_logging

    setup_logging(settings.log_level, log_file=settings.log_file)
    log_sources(settings)
    if args.command == "poll":
        return _poll_once(settings)
    from edge_agent.service import serve

    return run_main(PROG, serve(settings))


class OutboxLocation(BaseModel):
    """What ``outbox *`` needs of the settings: where the file is. An operator runs it as
    the unit's user (``sudo -u pudu-bridge``), who may read config.yaml but not the
    root-only credentials, so nothing the service would demand (the callback code) is."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    outbox_path: Path = config.EdgeSettings.model_fields["outbox_path"].default


def load_outbox_location(path: str | None,
                         environ: Mapping[str, str] | None = None) -> OutboxLocation:
    """``outbox_path`` from the service's own sources in their order (OUTBOX_PATH, then
    ``path`` or EDGE_AGENT_CONFIG, then the default); ConfigError if it is not a path."""
    env = os.environ if environ is None else environ
    return load_settings(OutboxLocation, path=path or env.get("EDGE_AGENT_CONFIG"),
                         env_map={"OUTBOX_PATH": "outbox_path"}, environ=env)


def _outbox(args: argparse.Namespace) -> int:
    """``outbox stats | peek | backup``: read (or copy) the file, demanding no other setting."""
    from edge_agent.outbox_view import backup, peek_entries, stats

    location = load_or_exit(PROG, lambda: load_outbox_location(getattr(args, "config", None)))
    if isinstance(location, int):
        return location
    where = location.outbox_path
    try:
        if args.outbox_command == "stats":
            out: object = stats(where)
        elif args.outbox_command == "backup":
            out = backup(where, Path(args.dest))
        else:
            out = peek_entries(where, max(1, args.n))
    except OutboxError as exc:
        return report_problems(PROG, [str(exc)])
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    """``check-config``: the settings as this process's environment gives them."""
    settings = load_or_exit(PROG, lambda: config.load(getattr(args, "config", None)))
    if isinstance(settings, int):
        return settings
    path = getattr(args, "config", None) or os.environ.get("EDGE_AGENT_CONFIG")
    code = check_config(PROG, settings, lambda s: config_checks.problems(s, path),
                        (lambda s: config_checks.connect_problems(s, path)) if args.connect
                        else None, warnings=config_checks.warnings)
    if code == 0 and settings.pudu.polling:
        # On stderr: stdout stays the settings' JSON for scripts.
        print(f"{PROG}: {config_checks.next_runs(settings.pudu)}", file=sys.stderr)
    return code


def _poll_once(settings: config.EdgeSettings) -> int:
    """One reconciliation (through the running agent if there is one); its record."""
    if not settings.pudu.configured:
        return report_problems(PROG, ["polling needs PUDU_API_URL, PUDU_API_KEY and "
                                      "PUDU_API_SECRET"])
    if not settings.pudu.shop_ids:
        from edge_agent.pudu.poller import NO_SHOPS

        return report_problems(PROG, [NO_SHOPS])
    from bridge.service.event_loop import run
    from edge_agent.pudu.once import poll_once

    records: list[dict[str, object]] = []
    run(poll_once(settings, records))
    print(json.dumps(records[0], indent=2))
    return 0 if records[0].get("status") in ("ok", "partial") else 1


def main(argv: list[str] | None = None) -> int:
    return guarded(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
