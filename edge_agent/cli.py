"""``edge-agent run | check-config [--connect] | outbox stats | outbox peek [-n N] |
poll --once``: maps flags onto EdgeSettings and nothing more (exit codes: bridge.lifecycle)."""

from __future__ import annotations

import json
import sys

from bridge.cli import (
    check_config,
    guarded,
    load_or_exit,
    parser,
    report_problems,
    report_warnings,
)
from bridge.errors import OutboxError
from bridge.lifecycle import run_main
from edge_agent import checks, config

PROG = "edge-agent"


def _main(argv: list[str] | None) -> int:
    top, sub, common = parser(PROG, __doc__, "EDGE_AGENT_CONFIG")
    sub.add_parser("run", parents=[common], help="run the service")
    check = sub.add_parser("check-config", parents=[common],
                           help="run the checks `run` runs, then print the effective settings")
    check.add_argument("--connect", action="store_true", help="also connect to the broker")
    outbox = sub.add_parser("outbox", parents=[common],
                            help="look into the outbox file (safe beside a running agent)")
    what = outbox.add_subparsers(dest="outbox_command", required=True)
    what.add_parser("stats", parents=[common], help="depth, ages, size, by channel")
    peek = what.add_parser("peek", parents=[common], help="the oldest entries")
    peek.add_argument("-n", type=int, default=10, help="how many (default 10)")
    poll = sub.add_parser("poll", parents=[common],
                          help="run one Pudu cloud reconciliation and print its record")
    poll.add_argument("--once", action="store_true", required=True,
                      help="one run now (through the running agent if there is one)")
    args = top.parse_args(argv)
    settings = load_or_exit(PROG, lambda: config.load(getattr(args, "config", None)))
    if isinstance(settings, int):
        return settings
    if args.command == "check-config":
        code = check_config(PROG, settings, checks.problems,
                            checks.connect_problems if args.connect else None,
                            warnings=checks.warnings)
        if code == 0 and settings.pudu.polling:
            # On stderr: stdout stays the settings' JSON for scripts.
            print(f"{PROG}: {checks.next_runs(settings.pudu)}", file=sys.stderr)
        return code
    if args.command == "outbox":
        from edge_agent.outbox_view import peek_entries, stats

        try:
            if args.outbox_command == "stats":
                out: object = stats(settings.outbox_path)
            else:
                out = peek_entries(settings.outbox_path, max(1, args.n))
        except OutboxError as exc:
            return report_problems(PROG, [str(exc)])
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    found = checks.problems(settings)
    if found:
        return report_problems(PROG, found)
    if args.command == "run":
        report_warnings(PROG, checks.warnings(settings))
    from bridge.logs import setup_logging

    setup_logging(settings.log_level)
    if args.command == "poll":
        return _poll_once(settings)
    from edge_agent.service import serve

    return run_main(PROG, serve(settings))


def _poll_once(settings: config.EdgeSettings) -> int:
    """One reconciliation (through the running agent if there is one); its record."""
    if not settings.pudu.configured:
        return report_problems(PROG, ["polling needs PUDU_API_URL, PUDU_API_KEY and "
                                      "PUDU_API_SECRET"])
    if not settings.pudu.shop_ids:
        from edge_agent.pudu.poller import NO_SHOPS

        return report_problems(PROG, [NO_SHOPS])
    from bridge.loop import run
    from edge_agent.pudu.once import poll_once

    records: list[dict[str, object]] = []
    run(poll_once(settings, records))
    print(json.dumps(records[0], indent=2))
    return 0 if records[0].get("status") in ("ok", "partial") else 1


def main(argv: list[str] | None = None) -> int:
    return guarded(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
