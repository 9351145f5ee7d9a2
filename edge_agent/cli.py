"""``edge-agent run | check-config``: maps flags onto EdgeSettings and nothing more."""

from __future__ import annotations

import argparse
import json
import sys

from bridge.config import masked
from bridge.errors import ConfigError
from bridge.lifecycle import run_main
from bridge.logs import setup_logging
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
    from edge_agent.service import serve

    return run_main("edge-agent", serve(settings))


if __name__ == "__main__":
    sys.exit(main())
