"""``edge-agent run | check-config | poll --once``: maps flags onto EdgeSettings."""

from __future__ import annotations

import argparse
import json
import sys

from bridge.config import masked
from bridge.errors import ConfigError
from bridge.logs import setup_logging
from bridge.loop import run as run_service
from edge_agent import config


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML settings file (or EDGE_AGENT_CONFIG)")
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--config", help="YAML settings file (or EDGE_AGENT_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the service")
    sub.add_parser("check-config", parents=[common],
                   help="validate and print the effective settings")
    poll = sub.add_parser("poll", parents=[common],
                          help="run one Pudu cloud reconciliation and print its record")
    poll.add_argument("--once", action="store_true", required=True,
                      help="one run now (through the running agent if there is one)")
    args = parser.parse_args(argv)
    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return 1
    if args.command == "check-config":
        print(json.dumps(masked(settings), indent=2))
        return 0
    setup_logging(settings.log_level)
    if args.command == "poll":
        if not settings.pudu.configured:
            print("edge-agent: polling needs PUDU_API_URL, PUDU_API_KEY and PUDU_API_SECRET",
                  file=sys.stderr)
            return 1
        from edge_agent.pudu.once import poll_once

        records: list[dict[str, object]] = []
        run_service(poll_once(settings, records))
        print(json.dumps(records[0], indent=2))
        return 0 if records[0].get("status") in ("ok", "partial") else 2
    from edge_agent.service import serve

    try:
        run_service(serve(settings))
    except ConfigError as exc:  # found only when a part starts (e.g. a TLS key that does not fit)
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
